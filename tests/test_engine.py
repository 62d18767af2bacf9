"""The measurement engine on the simulated family: timeline, counts, decode modes, failures."""
import math

import pytest
from PIL import Image

from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure import engine
from flexvlm_ray.measure.engine import measure_pass, run_unit
from flexvlm_ray.models.simulated import EOS, SimulatedAdapter
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import load_spec_text
from flexvlm_ray.store.schema import rows_to_table

SPEC = """
name: t
experiment: x
model: {family: simulated, options: {decode_ms_per_token: 0.2, vision_ms_per_crop: 0.5}}
datasets: [{name: probe_grid, num_samples: 2}]
knobs: {max_new_tokens: [0, 1, 5]}
measure: {warmup: 1, runs_per_sample: 2, per_token_decode: true}
"""


def _adapter():
    return SimulatedAdapter(preset=None, path=None, dtype="float32", device="cpu", seed=0,
                            options={"decode_ms_per_token": 0.2, "vision_ms_per_crop": 0.5})


def _sample(width=672):
    return Sample(sample_id="s", image=Image.new("RGB", (width, 336)), prompt="q", references=["w2"])


@pytest.mark.parametrize("max_new,expected_tokens,decode_steps", [(0, 0, 0), (1, 1, 0), (5, 5, 4)])
def test_forced_length_and_timeline(max_new, expected_tokens, decode_steps):
    unit = [u for u in expand(load_spec_text(SPEC, source="x")) if u.knobs.max_new_tokens == max_new][0]
    row = measure_pass(adapter=_adapter(), sample=_sample(), unit=unit)
    assert row["num_output_tokens"] == expected_tokens
    assert len(row["T_decode_per_token"]) == decode_steps
    stages = row["T_vision_encoder"] + row["T_projector"] + row["T_LLM_prefill"] + row["T_LLM_decode"]
    assert math.isclose(row["T_total"], stages, rel_tol=1e-9)
    assert math.isclose(row["T_vision_total"], row["T_vision_encoder"] + row["T_projector"])
    assert math.isclose(row["T_LLM_decode"], sum(row["T_decode_per_token"]), abs_tol=1e-9)
    assert row["num_crops"] == 4 and row["num_vision_tokens"] == 4 * 144  # 336x672 -> 1x3 + global


def test_natural_decoding_stops_at_eos(monkeypatch):
    adapter = _adapter()
    unit = expand(load_spec_text(SPEC.replace("per_token_decode: true", "decode_mode: natural"), source="x"))[2]

    def decode_step(state):
        token = EOS if len(state.tokens) == 3 else 2
        state.tokens.append(token)
        return token

    monkeypatch.setattr(adapter, "decode_step", decode_step)
    row = measure_pass(adapter=adapter, sample=_sample(), unit=unit)
    assert unit.knobs.max_new_tokens == 5 and row["num_output_tokens"] == 4


def test_run_unit_rows_schema_and_bad_sample():
    unit = expand(load_spec_text(SPEC, source="x"))[2]
    samples = [(0, _sample()), (1, Sample(sample_id="bad", image=None, prompt="q", error="corrupt PNG"))]
    rows = run_unit(adapter=_adapter(), unit=unit, samples=samples, metric=None,
                    context={"worker": "w", "gpu_name": "cpu", "run_id": "r"})
    table = rows_to_table(rows)
    assert table.num_rows == 4  # 2 samples x 2 runs
    statuses = table.column("status").to_pylist()
    assert statuses == ["ok", "ok", "error", "error"]
    assert table.column("error_message").to_pylist()[2] == "corrupt PNG"
    assert table.column("run_index").to_pylist() == [0, 1, 0, 1]


def test_knobs_are_restored_after_a_failing_unit():
    adapter = SimulatedAdapter(preset=None, path=None, dtype="float32", device="cpu", seed=0,
                               options={"fail_when": {"max_new_tokens": 5}})
    unit = expand(load_spec_text(SPEC, source="x"))[2]
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_unit(adapter=adapter, unit=unit, samples=[(0, _sample())], metric=None, context={})
    assert adapter.knobs.max_new_tokens == 16  # back to the defaults


def test_seed_flops_formula():
    unit = expand(load_spec_text(SPEC, source="x"))[2]
    row = measure_pass(adapter=_adapter(), sample=_sample(), unit=unit)
    params = _adapter().param_counts()
    # the seeds' formula counts ViT patches (4 per pooled vision token here), not pooled tokens
    assert row["flops_vision"] == 2.0 * params["vision_encoder"] * 4 * row["num_vision_tokens"]
    assert row["flops_llm_prefill"] == 2.0 * params["llm"] * row["num_total_tokens"]
    assert row["flops_llm_decode"] == 2.0 * params["llm"] * 5
    assert row["flops_total"] == pytest.approx(sum(row[k] for k in (
        "flops_vision", "flops_projector", "flops_llm_prefill", "flops_llm_decode")))


def test_rows_to_table_rejects_unknown_fields():
    with pytest.raises(KeyError, match="not in the run schema"):
        rows_to_table([{"unit_id": "a", "T_bogus": 1.0}])


def _capturing(adapter, *, always=False):
    """The adapter 'captures a graph' in the first pass of every crop count it sees (in every pass if ``always``)."""
    seen, count = set(), [0]
    vision = adapter.vision_encoder

    def vision_encoder(prepared):
        if always or prepared.num_crops not in seen:
            seen.add(prepared.num_crops)
            count[0] += 1
        return vision(prepared)

    adapter.vision_encoder = vision_encoder
    adapter.setup_count = lambda: count[0]
    return adapter


@pytest.mark.parametrize("widths, warmup, expected", [
    ((672, 672, 1344), 0, [1, 0, 1]),       # a new crop count: its first pass is run again
    ((672, 672, 1344), 1, [0, 0, 0]),       # every new shape gets its own warm-up pass
    ((336,), 0, [1]),
])
def test_passes_that_did_one_time_setup_are_run_again(widths, warmup, expected):
    unit = expand(load_spec_text(SPEC.replace("warmup: 1, runs_per_sample: 2", f"warmup: {warmup}"), source="x"))[2]
    samples = [(i, _sample(width)) for i, width in enumerate(widths)]
    rows = run_unit(adapter=_capturing(_adapter()), unit=unit, samples=samples, metric=None, context={})
    assert [r["setup_passes"] for r in rows] == expected
    assert all(r["status"] == "ok" for r in rows)
    assert rows_to_table(rows).column("setup_passes").to_pylist() == expected


def test_a_pass_that_always_does_setup_is_kept_as_an_error_row():
    unit = expand(load_spec_text(SPEC.replace("warmup: 1, runs_per_sample: 2", "warmup: 0"), source="x"))[2]
    rows = run_unit(adapter=_capturing(_adapter(), always=True), unit=unit, samples=[(0, _sample())], metric=None,
                    context={})
    assert len(rows) == 1 and rows[0]["status"] == "error" and rows[0]["error_type"] == "SteadyStateError"
    assert rows[0]["setup_passes"] == engine.MAX_SETUP_PASSES - 1 and rows[0]["T_total"] > 0
    assert "one-time setup" in rows[0]["error_message"]


def test_seed_vision_flops_are_absent_without_a_patch_count(monkeypatch):
    adapter = _adapter()
    prepare = adapter.prepare

    def without_patches(**kw):
        prepared = prepare(**kw)
        prepared.extras.pop("num_patches")
        return prepared

    monkeypatch.setattr(adapter, "prepare", without_patches)
    row = measure_pass(adapter=adapter, sample=_sample(), unit=expand(load_spec_text(SPEC, source="x"))[2])
    assert row["flops_vision"] is None and row["flops_total"] is None and row["flops_llm_prefill"] > 0
