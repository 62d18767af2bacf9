"""The closed-loop (E4) run kind: spec checks, unit expansion, and the loop on the shipped tiny model
with 2 logical GPUs, where every row's knobs are what the policy returns for its request and budget."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from analysis_support import SWEEPS, assert_png_300dpi, cpu_overrides
from flexvlm_ray.cli import main
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import SpecError, load_spec, load_spec_text

SPEC = """
name: t
experiment: e4
model: {family: simulated, options: {decode_ms_per_token: 0.5}}
datasets: [{name: shapes_vqa, split: validation, num_samples: 4, shards: 2}]
knobs: {max_crops: [1, 4], top_k: [1, 8], active_blocks: [8, 16]}
measure: {warmup: 0, decode_mode: natural}
control: {policies: [static, {name: lut, guardrail: true}], budgets: [0.5, 1.0], train_samples: 6}
"""


@pytest.mark.parametrize("override,message", [
    ("control.policies=[nope]", "control.policies.0.name: Input should be 'flops_proxy', 'full', 'learned'"),
    ("control.policies=[{name: full, guardrail: true}]", "control.policies.0.guardrail: the full policy runs no"),
    ("control.policies=[lut, lut]", "control.policies: listed twice: lut"),
    ("control.train_split=validation", "datasets.0.split: 'validation' is also control.train_split"),
    ("control.train_split=dev", "control.train_split: 'dev' is not a split of shapes_vqa; allowed: train, validation, test"),
    ("control.budgets=[0.5, 3]", "control.budgets: budget fractions must be in (0, 2]"),
    ("control.budgets=[]", "control.budgets: give at least one budget fraction"),
    ("control.margin=0", "control.margin: Input should be greater than 0"),
    ("control.bogus=1", "control.bogus: unknown key; allowed keys here: policies, budgets, margin"),
    ("search=tune", "search: a control run takes its configurations from the knob grid"),
])
def test_bad_control_specs_name_the_problem(override, message):
    with pytest.raises(SpecError) as info:
        load_spec_text(SPEC, source="x.yaml", overrides=[override])
    assert any(message in line for line in info.value.problems), info.value.problems


def test_cli_rejects_a_bad_control_spec_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SPEC)
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "control.policies=[nope]"])
    assert result.exit_code == 2 and "control.policies.0.name" in result.output and "nope" in result.output
    assert "Traceback" not in result.output


def test_spec_policy_names_are_the_registered_policies():
    from flexvlm_ray.control import POLICIES
    from flexvlm_ray.spec.schema import POLICY_NAMES

    assert list(POLICY_NAMES) == POLICIES.names()


def test_expansion_has_train_reference_and_control_units():
    spec = load_spec_text(SPEC, source="x.yaml")
    units = expand(spec)
    roles = [u.control["role"] for u in units]
    # 8 configs train on one unit each; the full config on 2 held-out shards; 2 policies x 2 budgets x 2 shards
    assert (roles.count("train"), roles.count("reference"), roles.count("control")) == (8, 2, 8)
    assert {u.split for u in units if u.control["role"] == "train"} == {"train"}
    assert {u.num_samples for u in units if u.control["role"] == "train"} == {6}
    full = [u.knobs for u in units if u.control["role"] == "reference"][0]
    assert (full.max_crops, full.top_k, full.active_blocks) == (4, 8, 16)
    control = [u.control for u in units if u.control["role"] == "control"]
    assert {(c["policy"], c["guardrail"], c["budget_fraction"]) for c in control} == {
        ("static", False, 0.5), ("static", False, 1.0), ("lut", True, 0.5), ("lut", True, 1.0)}
    ids = [u.unit_id for u in units]
    assert len(set(ids)) == len(ids) and ids == [u.unit_id for u in expand(spec)]
    other = expand(load_spec_text(SPEC, source="x.yaml", overrides=["control.margin=0.8"]))
    changed = {u.unit_id for u in other} ^ set(ids)
    assert changed and all(u.control["role"] == "control" for u in units + other if u.unit_id in changed)


def test_specs_without_control_keep_their_hash_and_units():
    """A grid spec hashes as before control existed: its dump without search, tune, timeouts and control."""
    import hashlib

    from flexvlm_ray.run.launch import spec_hash

    plain = load_spec_text(SPEC.replace("control:", "#"), source="x.yaml")
    data = plain.model_dump(mode="json")
    assert data.pop("control") is None and data.pop("search") == "grid" and data.pop("tune") is None
    data.pop("timeouts")
    before = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert spec_hash(plain) == before
    assert all(u.control is None for u in expand(plain))


def test_e4_sweep_validates_on_gpu_defaults_and_cpu_overrides():
    gpu = load_spec(SWEEPS / "e4_end_to_end.yaml")
    assert (gpu.model.preset, gpu.experiment, gpu.control.budgets) == ("molmoe-1b", "e4", [0.35, 0.5, 0.7, 0.85, 1.0])
    cpu = load_spec(SWEEPS / "e4_end_to_end.yaml", overrides=cpu_overrides("e4_end_to_end"))
    assert (cpu.model.preset, cpu.model.dtype) == ("tiny", "float32")


def test_cpu_e4_sweep_runs_the_tiny_model_with_a_calibrated_guardrail_and_one_block_configs():
    spec = load_spec(SWEEPS / "e4_cpu_tiny.yaml")
    assert (spec.model.preset, spec.model.dtype, spec.experiment) == ("tiny", "float32", "e4")
    assert spec.control.guard_quantile == 0.95 and spec.control.margin == 1.0 and 1 in spec.knobs.active_blocks
    assert spec.control.budgets == [0.35, 0.5, 0.7, 0.85, 1.0] and spec.measure.pin_cpus
    units = expand(spec)
    control = [u.control for u in units if u.control["role"] == "control"]
    assert len(units) == 24 * 2 + 3 + 8 * 5 * 3 and all(c["calibrated"] for c in control)
    small = load_spec(SWEEPS / "e4_cpu_tiny.yaml", overrides=cpu_overrides("e4_cpu_tiny"))
    assert small.control.train_samples == 4


@pytest.mark.slow
def test_closed_loop_on_the_tiny_model_and_two_logical_gpus(ray_local, tmp_path):
    import numpy as np

    from flexvlm_ray.analysis.registry import analyze_run
    from flexvlm_ray.control import Controller, Guardrail, Request
    from flexvlm_ray.data import DATASETS
    from flexvlm_ray.models.base import Knobs
    from flexvlm_ray.run.launch import launch, resume
    from flexvlm_ray.store.reader import load_frame

    overrides = cpu_overrides("e4_end_to_end") + [
        "control.policies=[static, {name: lut, guardrail: true}, learned, random]", "datasets=[{name: shapes_vqa, "
        "split: validation, num_samples: 4, shards: 2}]"]
    run_dir, summary = launch(spec_path=str(SWEEPS / "e4_end_to_end.yaml"), overrides=overrides,
                              output=str(tmp_path / "out"), run_id="r", num_gpus=2, progress=False)
    assert summary.ok and summary.done == 8 + 2 + 4 * 2 * 2
    rows = load_frame(run_dir)
    assert set(rows["status"]) == {"ok"} and set(rows["role"]) == {"train", "reference", "control"}
    env = json.loads((run_dir / "env.json").read_text())
    assert len(env["workers"]) == 2

    reference = rows[rows["role"] == "reference"]
    control = rows[rows["role"] == "control"]
    p50 = float(np.median(reference["T_total"]))
    assert np.allclose(control["reference_p50_ms"], p50)
    assert np.allclose(control["budget_ms"], control["budget_fraction"] * p50)
    assert (control["violated"] == (control["T_total"] > control["budget_ms"])).all()
    assert (control["decision_us"] > 0).all() and (control["request_us"] > 0).all()
    assert set(control["policy"]) == {"static", "lut+guard", "learned", "random"}

    controller = Controller.load(run_dir / "control")
    samples = {s.sample_id: s for s in DATASETS.get("shapes_vqa").load(split="validation", num_samples=4, seed=0, path=None)}
    settings = load_spec(run_dir / "spec.yaml").control
    guardrail = Guardrail(settings.margin, calibrated=settings.guard_quantile is not None)
    assert guardrail.calibrated and controller.model.spread is not None
    for row in control.itertuples():
        request = Request.of_sample(samples[row.sample_id], dataset=row.dataset)
        name = row.policy.removesuffix("+guard")
        expected = controller.decide(request, row.budget_ms, policy=name,
                                     guardrail=guardrail if row.guardrail else None).knobs
        assert expected == controller.decide_reference(request, row.budget_ms, policy=name,
                                                       guardrail=guardrail if row.guardrail else None).knobs
        ran = Knobs(max_crops=int(row.max_crops), top_k=int(row.top_k), active_blocks=int(row.active_blocks),
                    block_policy=row.block_policy, max_new_tokens=int(row.max_new_tokens))
        assert ran == expected, (row.policy, row.budget_ms, row.sample_id)

    written = analyze_run(run_dir)
    result = json.loads((run_dir / "analysis" / "e4.json").read_text())
    assert result["quality_meaningful"] and set(result["cells"]["shapes_vqa"]) == {
        "full", "static", "lut+guard", "learned", "random"}
    assert set(result["targets"]) == {"lut+guard", "learned+guard"}
    for path in written:
        if path.suffix == ".png":
            assert_png_300dpi(path)
    assert "| lut+guard |" in (run_dir / "analysis" / "e4_table.md").read_text()

    _, again = resume(run_dir=str(run_dir), progress=False)       # nothing left: nothing re-run
    assert (again.skipped, again.done) == (summary.done, 0)


@pytest.mark.parametrize("run_dir", [str(p) for p in __import__("analysis_support").reference_runs("e4")])
def test_committed_e4_reference_run_reanalyses_to_its_committed_json(run_dir, tmp_path):
    """The committed analysis of every E4 reference run is what analysis/e4.py computes from its rows."""
    from pathlib import Path

    from analysis_support import analyze_to

    analyze_to(Path(run_dir), tmp_path)
    committed = json.loads((Path(run_dir) / "analysis" / "e4.json").read_text())
    again = json.loads((tmp_path / "e4.json").read_text())
    assert again == committed
    assert (tmp_path / "e4_table.md").read_text() == (Path(run_dir) / "analysis" / "e4_table.md").read_text()
