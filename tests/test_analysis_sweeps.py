"""Every experiment sweep validates as shipped (molmoe-1b, bfloat16) and with the CPU overrides
its '# cpu:' header documents (tiny, float32, small sample counts); each has a registered analysis."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from flexvlm_ray.analysis.registry import ANALYSES, _import_all
from analysis_support import SWEEPS, cpu_overrides
from flexvlm_ray.cli import main
from flexvlm_ray.spec.load import SpecError, load_spec

EXPERIMENT_SWEEPS = ["motivation_exp1", "motivation_exp2", "motivation_exp3", "motivation_exp4", "profiling_exp1",
                     "profiling_exp2", "profiling_exp3", "profiling_exp4", "e1", "m1", "m2"]


@pytest.mark.parametrize("sweep", EXPERIMENT_SWEEPS)
def test_sweep_validates_on_gpu_defaults_and_cpu_overrides(sweep):
    path = SWEEPS / f"{sweep}.yaml"
    gpu = load_spec(path)
    assert (gpu.model.family, gpu.model.preset, gpu.model.dtype) == ("flexmoe", "molmoe-1b", "bfloat16")
    assert gpu.experiment == sweep
    cpu = load_spec(path, overrides=cpu_overrides(sweep))
    assert (cpu.model.preset, cpu.model.dtype) == ("tiny", "float32")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0 and result.output.startswith("ok:"), result.output


@pytest.mark.parametrize("sweep", EXPERIMENT_SWEEPS)
def test_sweep_has_a_registered_analysis(sweep):
    _import_all()
    assert sweep in ANALYSES


@pytest.mark.parametrize("sweep,knob", [("profiling_exp2", "knobs.top_k"), ("profiling_exp3", "knobs.active_blocks"),
                                        ("m1", "knobs.active_blocks")])
def test_grids_beyond_tiny_need_the_documented_override(sweep, knob):
    with pytest.raises(SpecError, match=knob):
        load_spec(SWEEPS / f"{sweep}.yaml", overrides=["model.preset=tiny"])
    assert any(o.startswith(knob + "=") for o in cpu_overrides(sweep))


@pytest.mark.parametrize("sweep,checks", [
    ("motivation_exp3", {"datasets.0.name": "probe_grid", "datasets.0.num_samples": 12,
                         "measure.runs_per_sample": 10, "knobs.max_new_tokens": [0]}),
    ("motivation_exp4", {"knobs.max_new_tokens": [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
                         "datasets.0.num_samples": 10, "measure.decode_mode": "forced"}),
    ("profiling_exp2", {"knobs.top_k": [1, 2, 4, 8, 16, 32]}),
    ("profiling_exp3", {"knobs.active_blocks": list(range(1, 17))}),
    ("e1", {"measure.per_token_decode": True, "measure.block_parts": True}),
    ("m1", {"datasets.0.name": "shapes_vqa", "datasets.1.name": "shapes_caption", "measure.decode_mode": "natural"}),
    ("m2", {"measure.runs_per_sample": 30, "repeats": 3, "order": "interleave"}),
])
def test_sweeps_keep_the_seed_defaults(sweep, checks):
    spec = load_spec(SWEEPS / f"{sweep}.yaml").model_dump()
    for path, expected in checks.items():
        node = spec
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else node[part]
        assert node == expected, path
