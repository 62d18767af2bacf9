"""The Ray path on a local cluster with 2 logical GPUs (workers run on the CPU)."""
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from flexvlm_ray.run.launch import launch, resume, run_status
from flexvlm_ray.store.reader import load_frame
from flexvlm_ray.store.writer import RunStore

pytestmark = pytest.mark.slow

SPEC = """
name: t
experiment: quickstart
model: {{family: simulated, options: {{decode_ms_per_token: {decode_ms}{extra}}}}}
datasets: [{{name: probe_grid, num_samples: 4, shards: 2}}]
knobs: {{top_k: [1, 2, 8], active_blocks: [8, 16]}}
measure: {{warmup: 0}}
"""


def spec_text(decode_ms=0.5, extra=""):
    return SPEC.format(decode_ms=decode_ms, extra=extra)


def test_sweep_end_to_end_on_two_logical_gpus(ray_local, write_spec, tmp_path):
    run_dir, summary = launch(spec_path=str(write_spec(spec_text())), output=str(tmp_path / "out"),
                              run_id="r1", num_gpus=2, progress=False)
    assert summary.ok and summary.done == 12 and summary.rows == 24
    rows = load_frame(run_dir)
    assert len(rows) == 24 and set(rows["status"]) == {"ok"}
    assert rows.groupby("unit_id").size().eq(2).all()
    assert set(rows["worker"]) == {"worker-0", "worker-1"}  # both GPUs pulled work
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "env.json", "failures", "manifest.json",
                                                         "parts", "rows.parquet", "spec.yaml", "units.jsonl",
                                                         "walltime.json"]
    assert set(summary.breakdown["workers"]) == {"worker-0", "worker-1"}
    assert RunStore(run_dir).read_rows().compacted  # the finished run reads from one file
    env = (run_dir / "env.json").read_text()
    assert '"gpu_name": "cpu"' in env and '"ray":' in env
    status = run_status(run_dir)
    assert (status["done"], status["failed"], status["pending"], status["rows"]) == (12, 0, 0, 24)
    assert RunStore(run_dir).manifest()["status"] == "complete"


def test_failing_units_become_records_and_the_rest_complete(ray_local, write_spec, tmp_path):
    run_dir, summary = launch(spec_path=str(write_spec(spec_text(extra=", fail_when: {top_k: 2}"))),
                              output=str(tmp_path / "out"), run_id="r", num_gpus=2, progress=False)
    assert (summary.done, summary.failed) == (8, 4)
    failures = RunStore(run_dir).failure_records()
    assert len(failures) == 4
    record = next(iter(failures.values()))
    assert record["error_type"] == "RuntimeError" and "simulated failure" in record["message"]
    assert "Traceback" in record["traceback"] and record["unit"]["knobs"]["top_k"] == 2
    assert run_status(run_dir)["failures_by_type"] == {"RuntimeError": 4}
    # resuming retries exactly the failed units, which fail again; nothing done is re-run
    _, again = resume(run_dir=str(run_dir), progress=False)
    assert (again.skipped, again.done, again.failed) == (8, 0, 4)


def test_dead_worker_is_replaced_and_only_the_crashing_units_fail(ray_local, write_spec, tmp_path):
    run_dir, summary = launch(spec_path=str(write_spec(spec_text(extra=", crash_when: {top_k: 2, active_blocks: 8}"))),
                              output=str(tmp_path / "out"), run_id="r", num_gpus=2, progress=False)
    failures = RunStore(run_dir).failure_records()
    assert {r["error_type"] for r in failures.values()} == {"WorkerDied"}
    assert {(r["unit"]["knobs"]["top_k"], r["unit"]["knobs"]["active_blocks"]) for r in failures.values()} == {(2, 8)}
    assert all(r["worker_deaths"] == 2 for r in failures.values())  # retried once on a fresh worker
    assert summary.failed == len(failures) == 2  # both shards of the crashing config
    assert summary.done == 10 and len(load_frame(run_dir)) == 20


def test_killed_driver_then_resume_stores_every_unit_exactly_once(ray_local, write_spec, tmp_path):
    spec = write_spec(spec_text(decode_ms=60))  # ~1 s per unit
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flexvlm_ray.cli", "launch", str(spec), "--num-gpus", "2",
                             "--output", str(out), "--run-id", "k", "--no-progress", "--no-analyze"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "w"),
                            start_new_session=True)
    parts = out / "t" / "k" / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("*.parquet"))) < 3:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(list(parts.glob("*.parquet")))
    assert 3 <= before < 12, ("the driver must die mid-sweep for this test to mean anything; its log:\n"
                              + (tmp_path / "driver.log").read_text()[-3000:])
    status = run_status(out / "t" / "k")
    assert status["pending"] == 12 - before

    _, summary = resume(run_dir=str(out / "t" / "k"), progress=False)
    assert summary.skipped == before and summary.done == 12 - before
    tables = [pq.read_table(p) for p in sorted(parts.glob("*.parquet"))]
    assert len(tables) == 12
    unit_ids = [t.column("unit_id").unique().to_pylist() for t in tables]
    assert all(len(u) == 1 for u in unit_ids) and len({u[0] for u in unit_ids}) == 12
    rows = load_frame(out / "t" / "k")
    assert rows.groupby("unit_id").size().eq(2).all()  # 2 samples per shard, none twice
    assert not list((out / "t" / "k").glob("**/.*.tmp"))


def test_resume_refuses_a_changed_spec(ray_local, write_spec, tmp_path):
    from flexvlm_ray.spec.load import SpecError

    run_dir, _ = launch(spec_path=str(write_spec(spec_text())), output=str(tmp_path / "out"), run_id="r",
                        num_gpus=2, progress=False)
    frozen = run_dir / "spec.yaml"
    frozen.write_text(frozen.read_text().replace("- 8\n", "- 4\n", 1))
    with pytest.raises(SpecError, match="changed since the run started"):
        resume(run_dir=str(run_dir), progress=False)


def test_launch_refuses_an_existing_run_folder(ray_local, write_spec, tmp_path):
    path = str(write_spec(spec_text()))
    launch(spec_path=path, output=str(tmp_path / "out"), run_id="same", num_gpus=2, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        launch(spec_path=path, output=str(tmp_path / "out"), run_id="same", num_gpus=2, progress=False)


def test_live_metrics_count_rows_and_rate(ray_local, write_spec, tmp_path):
    from flexvlm_ray.run.metrics import LiveMetrics

    run_dir, _ = launch(spec_path=str(write_spec(spec_text())), output=str(tmp_path / "out"), run_id="m",
                        num_gpus=2, progress=False)
    table = load_frame(run_dir)
    import pyarrow as pa
    metrics = LiveMetrics(sweep="t")
    metrics.unit_finished(ok=True, worker="worker-0", table=pa.Table.from_pandas(table, preserve_index=False))
    metrics.unit_finished(ok=False, worker="worker-1", table=None)
    assert metrics.total_rows == len(table) == 24


def test_a_hung_unit_becomes_a_timeout_failure_and_the_sweep_goes_on(ray_local, write_spec, tmp_path):
    # the limit is far above a normal unit (milliseconds) plus a replaced worker's start on a busy CPU,
    # which counts toward the unit it runs first
    text = spec_text(extra=", hang_when: {top_k: 2, active_blocks: 8}") + "timeouts: {unit_s: 30}\n"
    run_dir, summary = launch(spec_path=str(write_spec(text)), output=str(tmp_path / "out"), run_id="r",
                              num_gpus=2, progress=False)
    failures = RunStore(run_dir).failure_records()
    assert {r["error_type"] for r in failures.values()} == {"Timeout"}
    assert {(r["unit"]["knobs"]["top_k"], r["unit"]["knobs"]["active_blocks"]) for r in failures.values()} == {(2, 8)}
    assert "timeouts.unit_s=30 s" in next(iter(failures.values()))["message"]
    assert (summary.done, summary.failed) == (10, 2) and len(load_frame(run_dir)) == 20


def test_workers_that_do_not_start_in_time_stop_the_run_with_a_retryable_error(ray_local, write_spec, tmp_path):
    from flexvlm_ray.run.scheduler import SweepAborted

    text = spec_text(extra=", load_s: 60") + "timeouts: {worker_start_s: 2}\n"
    with pytest.raises(SweepAborted, match=r"did not start and load the model within 2 s") as info:
        launch(spec_path=str(write_spec(text)), output=str(tmp_path / "out"), run_id="r", num_gpus=2, progress=False)
    assert info.value.retryable and info.value.run_dir == tmp_path / "out" / "t" / "r"


def test_a_cluster_without_free_gpus_says_so(ray_local, write_spec, tmp_path):
    import ray

    from flexvlm_ray.run.scheduler import SweepAborted

    holder = ray.remote(num_gpus=2, num_cpus=0)(type("Holder", (), {"ping": lambda self: 1})).remote()
    ray.get(holder.ping.remote())  # both logical GPUs are now held by another actor
    try:
        with pytest.raises(SweepAborted, match=r"no free GPU: the cluster has 2 GPU\(s\)"):
            launch(spec_path=str(write_spec(spec_text())), output=str(tmp_path / "out"), run_id="r", num_gpus=2,
                   progress=False)
    finally:
        ray.kill(holder)


def test_ctrl_c_exits_130_and_prints_the_resume_command(write_spec, tmp_path):
    spec = write_spec(spec_text(decode_ms=60))  # ~1 s per unit
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "flexvlm_ray.cli", "launch", str(spec), "--num-gpus", "2",
                             "--output", str(out), "--run-id", "c", "--no-progress", "--no-analyze"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    parts = out / "t" / "c" / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("*.parquet"))) < 2:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the driver
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert f"resume with: flexvlm-ray launch --resume {out / 't' / 'c'}" in stderr
    assert "Traceback" not in stderr
    assert RunStore(out / "t" / "c").manifest()["status"] == "interrupted"
