"""Where a sweep's wall time goes (measure.walltime): every instant filed under one phase, captures apart
from the passes, warm-up once per shape and knob setting per worker, units in graph-sharing order."""
import json

import pytest

from flexvlm_ray.measure import walltime
from flexvlm_ray.measure.walltime import PHASES, WallClock, breakdown_line, run_breakdown
from flexvlm_ray.models.simulated import SimulatedAdapter
from flexvlm_ray.run.worker import ModelWorker
from flexvlm_ray.spec.expand import expand, shape_order
from flexvlm_ray.spec.load import load_spec_text

SPEC = """
name: t
experiment: x
model: {family: simulated, device: cpu, dtype: float32,
        options: {decode_ms_per_token: 0.2, vision_ms_per_crop: 0.2, prefill_ms_per_token: 0.0, load_s: 0.05}}
datasets: [{name: probe_grid, num_samples: 3}]
knobs: {max_new_tokens: 3, top_k: [1, 2]}
measure: {warmup: 1, runs_per_sample: 2}
repeats: 2
"""


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_phases_add_up_to_the_wall_time_by_construction():
    now = FakeTime()
    c = WallClock(phase="build", now=now)
    now.t += 2.0
    c.switch("idle")
    now.t += 0.5
    with c.phase("timed"):
        now.t += 1.0
        with c.phase("prepare"):
            now.t += 0.25
        now.t += 1.0
    c.move(1.5, source="timed", dest="capture")
    now.t += 0.75
    snap = c.snapshot()
    assert snap["wall_s"] == pytest.approx(5.5)
    assert snap["phases_s"] == pytest.approx({**{p: 0.0 for p in PHASES}, "build": 2.0, "idle": 1.25,
                                              "timed": 0.5, "capture": 1.5, "prepare": 0.25})
    assert sum(snap["phases_s"].values()) == pytest.approx(snap["wall_s"])
    with pytest.raises(ValueError, match="unknown wall-time phase"):
        c.switch("lunch")


def test_a_pass_that_did_setup_is_filed_as_capture():
    c = WallClock()
    setups = iter([0, 1, 1, 1])
    with c.active():
        with walltime.model_pass("timed", setup_count=lambda: next(setups)) as filed:
            pass
        assert filed["setup"]
        with walltime.model_pass("timed", setup_count=lambda: next(setups)) as filed:
            pass
        assert not filed["setup"]
    assert c.counts["capture_passes"] == 1 and c.counts["timed_passes"] == 1
    # without an active clock nothing is recorded and nothing fails
    with walltime.model_pass("warmup", setup_count=lambda: 0):
        pass


@pytest.fixture(scope="module")
def worker_rows():
    units = expand(load_spec_text(SPEC, source="x"))
    spec_model = units[0].model
    worker = ModelWorker(model=spec_model, seed=0, name="w0")
    results = [worker.run(u.to_dict(), "r") for u in units]
    return units, worker, results


def test_worker_breakdown_sums_to_its_wall_time(worker_rows):
    _, worker, results = worker_rows
    assert all(r["ok"] for r in results)
    snap = worker.walltime()
    phases = snap["phases_s"]
    # every instant since the worker's clock started is in exactly one phase
    assert sum(phases.values()) == pytest.approx(snap["wall_s"], rel=1e-9, abs=1e-6)
    assert phases["build"] >= 0.05                    # the simulated model's load_s
    assert phases["timed"] > 0 and phases["warmup"] > 0 and phases["prepare"] > 0 and phases["data"] > 0
    assert snap["counts"]["units"] == len(results)
    # each unit's snapshot is the worker's clock so far: monotone wall time
    walls = [r["walltime"]["wall_s"] for r in results]
    assert walls == sorted(walls)


def test_a_shape_seen_in_an_earlier_unit_of_the_worker_is_not_warmed_up_again(worker_rows):
    units, worker, results = worker_rows
    import pyarrow as pa

    table = pa.concat_tables([r["table"] for r in results]).to_pydict()
    by_unit: dict[str, int] = {}
    for unit_id, warmed in zip(table["unit_id"], table["warmup_passes"]):
        by_unit[unit_id] = by_unit.get(unit_id, 0) + warmed
    first_repeat = [u.unit_id for u in units if u.repeat == 0]
    second_repeat = [u.unit_id for u in units if u.repeat == 1]
    assert all(by_unit[u] > 0 for u in first_repeat)           # new knob settings: warmed up
    assert all(by_unit[u] == 0 for u in second_repeat)         # the same shapes again: not warmed up
    # the clock counts every warm-up pass: each warm-up is a plain and a hooked pass here (no captures)
    assert worker.walltime()["counts"]["warmup_passes"] == 2 * sum(by_unit.values())


def test_without_a_worker_set_every_unit_warms_up_its_shapes():
    from flexvlm_ray.measure.engine import run_unit

    units = expand(load_spec_text(SPEC, source="x"))
    adapter = SimulatedAdapter(preset=None, path=None, dtype="float32", device="cpu", seed=0, options={})
    from flexvlm_ray.data import DATASETS

    samples = list(enumerate(DATASETS.get("probe_grid").load(split="validation", num_samples=1, seed=0, path=None)))
    for unit in (units[0], units[0]):
        rows = run_unit(adapter=adapter, unit=unit, samples=samples, metric=None, context={})
        assert rows[0]["warmup_passes"] == 1


def test_run_breakdown_and_its_line():
    worker = {"wall_s": 10.0, "phases_s": {**{p: 0.0 for p in PHASES}, "build": 2.0, "timed": 5.0, "warmup": 1.0,
                                           "capture": 1.0, "host": 0.5, "idle": 0.5},
              "counts": {"timed_passes": 50, "units": 3}}
    b = run_breakdown(driver={"ray_start_s": 3.0, "workers_start_s": 2.5, "units_s": 7.5, "finish_s": 0.25,
                              "analysis_s": 0.25}, workers={"w0": worker})
    assert b["after_ray_s"] == pytest.approx(10.5)
    assert b["passes_fraction"] == pytest.approx(6.0 / 10.5)
    assert b["counts"] == {"timed_passes": 50, "units": 3}
    line = breakdown_line(b)
    assert line.startswith("wall time: 10.5 s after Ray start; model passes 57% of it")
    assert "captures 1.0" in line and "analysis 0.2" in line and "Ray start 3.0" in line
    assert max(len(x) for x in line.splitlines()) <= 100


SHAPE_SPEC = """
name: t
experiment: x
model: {family: simulated}
datasets: [{name: probe_grid, num_samples: 2}, {name: shapes_vqa, num_samples: 2, shards: 2}]
knobs: {max_crops: [1, 4, 12], top_k: [1, 8], active_blocks: [8, 16], block_policy: [prefix, importance]}
repeats: 2
order: ORDER
"""


def test_shape_order_groups_graph_keys_keeps_unit_ids_and_is_stable():
    grid = expand(load_spec_text(SHAPE_SPEC.replace("ORDER", "grid"), source="x"))
    shaped = expand(load_spec_text(SHAPE_SPEC.replace("ORDER", "shape"), source="x"))
    again = expand(load_spec_text(SHAPE_SPEC.replace("ORDER", "shape"), source="x"))
    assert [u.unit_id for u in shaped] == [u.unit_id for u in again]            # stable
    assert sorted(u.unit_id for u in shaped) == sorted(u.unit_id for u in grid)  # same units, same ids
    assert [u.index for u in shaped] == list(range(len(shaped)))
    keys = [(u.repeat, shape_order(u.knobs)) for u in shaped]
    assert keys == sorted(keys)                                                # repeat-major, then shape
    # units that share a decoder graph key (blocks, policy, top_k) are consecutive within a repeat
    runs = [(u.repeat, u.knobs.active_blocks, u.knobs.block_policy, u.knobs.top_k) for u in shaped]
    changes = sum(1 for a, b in zip(runs, runs[1:]) if a != b)
    assert changes == len(set(runs)) - 1
    # within one shape key, the grid's relative order is kept (datasets, shards)
    same = [u for u in shaped if u.repeat == 0 and u.knobs == shaped[0].knobs]
    assert [(u.dataset, u.shard) for u in same] == [("probe_grid", 0), ("shapes_vqa", 0), ("shapes_vqa", 1)]


def test_launch_writes_the_breakdown_and_prints_its_line(tmp_path):
    """One Ray run on the CPU: walltime.json in the run folder, its line in the launch output."""
    from click.testing import CliRunner

    from flexvlm_ray.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.replace("repeats: 2", "repeats: 1"))
    result = CliRunner().invoke(main, ["launch", str(spec), "--num-gpus", "1", "--output", str(tmp_path / "out"),
                                       "--run-id", "r", "--no-progress", "--no-analyze"])
    assert result.exit_code == 0, result.output
    assert "wall time:" in result.output and "after Ray start" in result.output
    data = json.loads((tmp_path / "out" / "t" / "r" / "walltime.json").read_text())
    assert len(data["sessions"]) == 1 and "analysis_s" in data["driver_s"]
    (worker,) = data["workers"].values()
    assert sum(worker["phases_s"].values()) == pytest.approx(worker["wall_s"], rel=1e-6)
    assert worker["counts"]["units"] == 2
    # the workers' clocks run inside the driver's wall time after Ray start
    assert worker["wall_s"] <= data["after_ray_s"] + 0.5
