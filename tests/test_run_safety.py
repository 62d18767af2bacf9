"""A run folder that defends itself (issue 22): one writer at a time, corruption detected and
repaired, bounded specs and workers, loopback-only Ray, no remote code without consent."""
import datetime as dt
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flexvlm_ray.run.launch import check_run_id, launch, resume, run_status
from flexvlm_ray.run.tune_search import units_frame
from flexvlm_ray.spec.load import SpecError, load_spec_text
from flexvlm_ray.store.lock import RunLock, RunLocked, holder
from flexvlm_ray.store.reader import load_frame
from flexvlm_ray.store.schema import rows_to_table
from flexvlm_ray.store.writer import CorruptPart, RunStore, StoreError

ROOT = Path(__file__).resolve().parents[1]


def make_run(root: Path, *, units: int = 4, rows: int = 2, status: str = "complete") -> RunStore:
    """A run folder of ``units`` parts written as the driver writes them (no Ray)."""
    store = RunStore(root / "run")
    store.create(spec_text="# test\n", spec_hash="h", units=[], run_id="r")
    ids = [f"u{i:03d}" for i in range(units)]
    now = dt.datetime.now(dt.timezone.utc)
    for i, unit_id in enumerate(ids):
        store.write_part(unit_id, rows_to_table([
            {"unit_id": unit_id, "sample_index": j, "T_total": 10.0 * i + j, "gpu_name": "cpu",
             "worker": f"worker-{i % 2}", "status": "ok", "timestamp": now} for j in range(rows)]))
    store.update_manifest(unit_ids=ids, status=status)
    return store


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flexvlm_ray", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


# -- concurrency and isolation ------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLocked) as info:
            RunLock(tmp_path / "run").acquire(attempts=2)
        assert holder(tmp_path / "run")["pid"] == os.getpid()
    message = str(info.value)
    assert f"pid {os.getpid()}" in message and "\n" not in message
    assert holder(tmp_path / "run") is None  # released: nobody holds it


def test_a_stale_lock_of_a_killed_driver_is_taken_over(tmp_path):
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from flexvlm_ray.store.lock import RunLock; "
            f"RunLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert holder(tmp_path / "run")["pid"] == proc.pid
        with pytest.raises(RunLocked, match=f"pid {proc.pid}"):
            RunLock(tmp_path / "run").acquire(attempts=2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holder(tmp_path / "run") is None  # the kernel dropped the dead holder's lock
    lock = RunLock(tmp_path / "run").acquire()
    try:
        assert lock.took_over["pid"] == proc.pid  # the dead holder's note, taken over
    finally:
        lock.release()


def test_resume_while_a_driver_holds_the_run_is_refused_and_deletes_nothing(tmp_path):
    store = make_run(tmp_path, status="running")
    in_flight = store.parts / ".u009.parquet.abc.tmp"
    in_flight.write_bytes(b"half a part")
    with RunLock(store.root):
        with pytest.raises(RunLocked):
            resume(run_dir=str(store.root), progress=False)
        assert in_flight.exists()  # the live driver's write in flight is left alone
        assert run_status(store.root)["status"] == "running"


@pytest.mark.parametrize("manifest_status, locked, shown", [
    ("running", False, "interrupted"),   # SIGKILLed driver: the manifest still says running
    ("running", True, "running"),
    ("complete", False, "complete"),
])
def test_status_says_interrupted_when_no_live_driver_holds_the_lock(tmp_path, manifest_status, locked, shown):
    store = make_run(tmp_path, status=manifest_status)
    lock = RunLock(store.root).acquire() if locked else None
    try:
        assert run_status(store.root)["status"] == shown
    finally:
        if lock:
            lock.release()


# -- corruption ------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garble(path: Path) -> None:
    path.write_bytes(b"PAR1" + os.urandom(path.stat().st_size - 8) + b"PAR1")


def _flip(offset_fraction: float):
    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[int(offset_fraction * (len(data) - 1))] ^= 0x04
        path.write_bytes(bytes(data))
    return flip


@pytest.mark.parametrize("damage", [_truncate, _empty, _garble, _flip(0.0), _flip(0.3), _flip(0.6), _flip(1.0)],
                         ids=["truncated", "empty", "garbled", "bit@start", "bit@30%", "bit@60%", "bit@end"])
def test_a_corrupt_part_is_left_out_reported_and_moved_aside_for_rerun(tmp_path, capsys, damage):
    store = make_run(tmp_path)
    damage(store.parts / "u002.parquet")
    with pytest.raises(CorruptPart):
        store.read_part("u002")
    rows = load_frame(store.root)
    assert sorted(set(rows["unit_id"])) == ["u000", "u001", "u003"] and len(rows) == 6
    searched = units_frame(store, ["u001", "u002"])  # what an adaptive search reads back per trial
    assert sorted(set(searched["unit_id"])) == ["u001"] and len(searched) == 2
    status = run_status(store.root)
    assert (status["done"], status["pending"], status["corrupt"]) == (3, 1, 1)
    assert "u002.parquet" in capsys.readouterr().err
    done, corrupt = store.verify_parts(move_aside=True)  # what --resume does under the lock
    assert corrupt == ["u002"] and "u002" not in store.done_ids()  # so the unit runs again
    assert [p.name.split(".")[0] for p in store.corrupt.iterdir()] == ["u002", "u002"]


def test_stray_copies_and_unknown_failure_records_are_ignored(tmp_path, capsys):
    store = make_run(tmp_path)
    (store.parts / "copy of u001.parquet").write_bytes((store.parts / "u001.parquet").read_bytes())
    store.write_failure("ffffffffffffffff", {"error_type": "X", "message": "not a unit of this run"})
    (store.failures / "u003.json").write_text('{"error_type": "Val')  # garbled record of a done unit
    assert len(load_frame(store.root)) == 8  # exactly the manifest's 4 units x 2 rows
    assert "not units of this run" in capsys.readouterr().err
    status = run_status(store.root)
    assert (status["done"], status["failed"], status["pending"], status["stray_files"]) == (4, 0, 0, 1)


def test_a_garbled_failure_record_counts_its_unit_as_pending(tmp_path, capsys):
    store = make_run(tmp_path, units=2)
    (store.parts / "u001.parquet").unlink()
    (store.failures / "u001.json").write_text("{garbled")
    status = run_status(store.root)
    assert (status["done"], status["failed"], status["pending"]) == (1, 0, 1)
    assert "u001.json is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("name, damage", [
    ("manifest.json", lambda p: p.write_text(p.read_text()[:40])),
    ("manifest.json", lambda p: p.write_text("[1, 2]")),
    ("manifest.json", lambda p: p.write_bytes(b"\xff\xfe garbage")),
])
def test_a_damaged_manifest_is_one_line_naming_it(tmp_path, name, damage):
    store = make_run(tmp_path)
    damage(store.root / name)
    with pytest.raises(StoreError, match=name) as info:
        run_status(store.root)
    assert "\n" not in str(info.value)
    proc = cli("status", str(store.root))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and name in proc.stderr


def test_a_truncated_units_file_is_detected(tmp_path):
    store = RunStore(tmp_path / "run")
    from flexvlm_ray.spec.expand import expand
    spec = load_spec_text(SPEC, source="s.yaml")
    units = expand(spec)
    store.create(spec_text=SPEC, spec_hash="h", units=units, run_id="r")
    path = store.root / "units.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(StoreError, match="units.jsonl is damaged"):
        store.units()


def test_a_units_line_that_is_not_a_work_unit_is_damage(tmp_path):
    """units.jsonl reads back into typed units (model and measure validated); a line that does not is
    damage, which --resume rewrites from spec.yaml."""
    from flexvlm_ray.run.launch import stored_units
    from flexvlm_ray.spec.expand import expand

    store = RunStore(tmp_path / "run")
    units = expand(load_spec_text(SPEC, source="s.yaml"))
    store.create(spec_text=SPEC, spec_hash="h", units=units, run_id="r")
    assert stored_units(store) == units
    path = store.root / "units.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["measure"]["warmup"] = -1
    path.write_text("\n".join([lines[0], json.dumps(bad)] + lines[2:]) + "\n")
    with pytest.raises(StoreError, match=r"units.jsonl is damaged \(a line is not a work unit: .*warmup"):
        stored_units(store)


def test_the_compacted_file_is_used_only_when_it_matches(tmp_path, capsys):
    store = make_run(tmp_path)
    assert store.compact()["units"] == 4
    read = store.read_rows()
    assert read.compacted and read.table.num_rows == 8
    from flexvlm_ray.analysis.registry import _rows   # what every analysis reads: the sweep's rows
    assert len(_rows(store.root, store.manifest())) == 8
    (store.parts / "u003.parquet").unlink()  # the parts changed since: back to reading them
    read = store.read_rows()
    assert not read.compacted and read.table.num_rows == 6
    store.compact()
    _flip(0.5)(store.root / "rows.parquet")  # a damaged compacted file: read the parts instead
    read = store.read_rows()
    assert not read.compacted and read.table.num_rows == 6
    assert "rows.parquet does not match its checksum" in capsys.readouterr().err


# -- bounds ------------------------------------------------------------------------------------------

SPEC = """
name: t
experiment: quickstart
model: {family: simulated, options: {decode_ms_per_token: 0.5}}
datasets: [{name: probe_grid, num_samples: 4, shards: 2}]
knobs: {top_k: [1, 8]}
measure: {warmup: 0}
"""


@pytest.mark.parametrize("text, expect", [
    (SPEC + "repeats: 1000000000\n", "repeats"),
    (SPEC.replace("shards: 2", "shards: 10000000"), "shards"),
    (SPEC.replace("top_k: [1, 8]", "top_k: {start: 1, stop: 1000000000}"), "at most 1024"),
    (SPEC.replace("top_k: [1, 8]", "max_new_tokens: 1000000000"), "<= 32768"),
    (SPEC.replace("top_k: [1, 8]", "top_k: [1, 8], active_blocks: {start: 1, stop: 1000}, "
                                   "max_new_tokens: {start: 1, stop: 1000}"), "--max-units"),
    (SPEC + 'description: &a ["x", "x"]\nseed: *a\n', "aliases"),
    (SPEC.replace("{decode_ms_per_token: 0.5}", "&b {decode_ms_per_token: 0.5}") + "extra: *b\n", "aliases"),
])
def test_spec_bounds_fail_fast_with_short_lines(text, expect):
    started = time.process_time()
    with pytest.raises(SpecError) as info:
        load_spec_text(text, source="s.yaml")
    assert expect in str(info.value)
    assert all(len(line) <= 300 for line in info.value.problems)
    assert time.process_time() - started < 30  # generous: the unbounded versions took minutes and GBs


@pytest.mark.parametrize("tokens, model, noted, refused", [
    (64, "", False, False), (4095, "", False, False), (4096, "", True, False), (32768, "", True, False),
    (4095, ", backend: fast", False, False), (4096, ", backend: fast", False, True),
    (4096, ", backend: fast, options: {cache_len: 8192}", True, False),
    (8192, ", backend: fast, options: {cache_len: 8192}", False, True)])
def test_outputs_past_the_trained_context_are_noted_and_past_a_static_cache_refused(capsys, tokens, model, noted,
                                                                                      refused):
    """Rotary positions are per token, so the hf backend runs past the trained 4096 positions (noted); the
    fast backend's static KV cache is a hard limit (refused in one line naming cache_len) unless raised."""
    text = (f"name: t\nexperiment: motivation_exp4\nmodel: {{family: flexmoe, preset: molmoe-1b{model}}}\n"
            f"datasets: [{{name: shapes_vqa, num_samples: 1}}]\nknobs: {{max_new_tokens: [{tokens}]}}\n")
    if refused:
        with pytest.raises(SpecError, match="raise model.options.cache_len"):
            load_spec_text(text, source="s.yaml")
    else:
        load_spec_text(text, source="s.yaml")
    assert ("trained context of 4096" in capsys.readouterr().err) == noted


def test_an_alias_bomb_returns_at_once():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(20))
    with pytest.raises(SpecError, match="aliases"):
        load_spec_text(SPEC + "description: " + json.dumps(bomb) + "\n" + bomb.replace("a:", "x_a:", 1),
                       source="s.yaml")


def test_the_unit_cap_can_be_raised():
    text = SPEC.replace("top_k: [1, 8]", "top_k: [1, 8], max_new_tokens: {start: 1, stop: 30}")
    with pytest.raises(SpecError, match="above the cap of 100"):
        load_spec_text(text, source="s.yaml", max_units=100)
    assert load_spec_text(text, source="s.yaml", max_units=120).knobs.max_new_tokens[-1] == 30


@pytest.mark.parametrize("gpus, pending, expected", [(8, 2, 2), (2, 8, 2), (4, 4, 4), (1, 1, 1)])
def test_workers_are_the_fewer_of_gpus_and_units(monkeypatch, gpus, pending, expected):
    from types import SimpleNamespace

    from flexvlm_ray.run import scheduler
    monkeypatch.setattr(scheduler, "gpu_slots", lambda gpu_types: [None] * gpus)
    monkeypatch.setattr(scheduler, "_free_gpus", lambda wanted: wanted)   # every GPU free (no Ray here)
    slots = scheduler.SweepDriver._make_slots([SimpleNamespace(gpu_type=None)] * pending, None)
    assert len(slots) == expected


@pytest.mark.parametrize("cores, mem_gib, asked, ok", [(2, 24, 64, False), (2, 24, 8, True), (16, 2, 4, False),
                                                       (16, 200, 64, True)])
def test_logical_gpus_are_capped_by_cores_and_memory(monkeypatch, cores, mem_gib, asked, ok):
    from flexvlm_ray.run import cluster
    monkeypatch.setattr(cluster, "detected_gpus", lambda: 0)
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(cluster, "available_memory_bytes", lambda: mem_gib * 2**30)
    if ok:
        cluster.check_num_gpus(num_gpus=asked, address=None)
    else:
        with pytest.raises(ValueError, match=f"--num-gpus {asked}: this machine has no GPU"):
            cluster.check_num_gpus(num_gpus=asked, address=None)


def test_unwritable_output_is_one_line_before_anything_starts(write_spec, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = cli("launch", str(write_spec(SPEC)), "--output", str(blocker / "sub"), "--num-gpus", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot write" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_full_disk_mid_run_is_a_resumable_error(ray_local, write_spec, tmp_path, monkeypatch):
    import errno

    from flexvlm_ray.run.launch import RunWriteFailed
    real_write = RunStore.write_part
    calls = []

    def full_after_three(self, unit_id, table):
        calls.append(unit_id)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, unit_id, table)

    monkeypatch.setattr(RunStore, "write_part", full_after_three)
    with pytest.raises(RunWriteFailed, match="the disk is full") as info:
        launch(spec_path=str(write_spec(SPEC)), output=str(tmp_path / "out"), run_id="full", num_gpus=2,
               progress=False)
    run_dir = info.value.run_dir
    assert RunStore(run_dir).manifest()["status"] == "interrupted" and len(RunStore(run_dir).done_ids()) == 3
    monkeypatch.setattr(RunStore, "write_part", real_write)
    _, summary = resume(run_dir=str(run_dir), num_gpus=2, progress=False)
    assert summary.ok and run_status(run_dir)["done"] == 4


def test_resume_reruns_a_corrupt_part_and_rewrites_a_truncated_units_file(ray_local, write_spec, tmp_path):
    run_dir, _ = launch(spec_path=str(write_spec(SPEC)), output=str(tmp_path / "out"), run_id="c", num_gpus=2,
                        progress=False)
    store = RunStore(run_dir)
    victim = store.manifest()["unit_ids"][1]
    _truncate(store.parts / f"{victim}.parquet")
    (run_dir / "units.jsonl").write_text((run_dir / "units.jsonl").read_text()[:50])
    _, summary = resume(run_dir=str(run_dir), num_gpus=2, progress=False)
    assert (summary.skipped, summary.done) == (3, 1)  # only the corrupt unit ran again
    assert len(store.units()) == 4 and len(load_frame(run_dir)) == 8
    assert run_status(run_dir)["status"] == "complete"


def test_a_run_folder_written_by_the_dict_based_units_reads_back_and_refuses_a_changed_resume(ray_local, tmp_path):
    """A committed run whose units.jsonl the dict-based WorkUnit wrote reads back into typed units; it was
    measured without the settings added since (burn-in, pinning on a GPU by default), so resuming it with
    this code is refused in one line naming why, and nothing in the folder changes."""
    import shutil

    from flexvlm_ray.run.launch import stored_units

    run_dir = tmp_path / "m2" / "ablate-default"
    shutil.copytree(ROOT / "results" / "reference" / "h200-2026-12-03" / "m2" / "ablate-default", run_dir)
    written = (run_dir / "units.jsonl").read_text()
    units = stored_units(RunStore(run_dir))
    assert len(units) == 2 and all(u.measure.burn_in_s == 0.0 and u.measure.pin_cpus is False for u in units)
    with pytest.raises(SpecError, match="a setting added since") as refused:
        resume(run_dir=str(run_dir), progress=False)
    assert len(refused.value.problems) == 1
    assert (run_dir / "units.jsonl").read_text() == written


# -- security ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("run_id, ok", [("../../x", False), ("/abs/x", False), ("a/b", False), ("..", False),
                                        (".hidden", False), ("a..b", False), ("x" * 129, False),
                                        ("20261203-120000", True), ("run_1.v2", True)])
def test_run_ids_cannot_leave_the_output_folder(run_id, ok):
    if ok:
        assert check_run_id(run_id) == run_id
    else:
        with pytest.raises(ValueError, match="one folder name"):
            check_run_id(run_id)


def test_launch_refuses_a_traversing_run_id_before_writing(write_spec, tmp_path):
    proc = cli("launch", str(write_spec(SPEC)), "--output", str(tmp_path / "out"), "--run-id", "../../x")
    assert proc.returncode == 2 and "one folder name" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


LISTEN_PROBE = """
import json, os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import ray
from flexvlm_ray.run.cluster import connect
from listen_support import listening_sockets
connect(num_gpus=1, address=None, dashboard=False)
@ray.remote(num_gpus=1, num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()
actor = Probe.remote()
ray.get(actor.pid.remote())
print(json.dumps(listening_sockets(os.getpid())), flush=True)
ray.shutdown()
"""


def test_a_local_cluster_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ENABLE")}
    proc = subprocess.run([sys.executable, "-c", LISTEN_PROBE.format(root=str(ROOT), tests=str(ROOT / "tests"))],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sockets = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sockets) >= 4  # GCS, raylet, driver and worker gRPC at least
    wide = [s for s in sockets if not s["loopback"]]
    assert not wide, f"listening beyond loopback: {wide}"


def test_no_remote_code_runs_during_validate_without_opt_in(tmp_path):
    from flexvlm_ray.models.qwen3_vl_moe.adapter import tiny_config
    folder = tmp_path / "ckpt"
    folder.mkdir()
    marker = tmp_path / "remote-code-ran"
    config = tiny_config().to_dict()
    # a model type transformers does not know: without trust_remote_code=False it would ask
    # "run the custom code? [y/N]" and, answered y, run configuration_evil.py in the driver
    config.update(model_type="evil_custom", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("ran")
        from transformers import PretrainedConfig
        class EvilConfig(PretrainedConfig):
            model_type = "evil_custom"
        """))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("{family: simulated, options: {decode_ms_per_token: 0.5}}",
                                 f"{{family: qwen3_vl_moe, path: {folder}}}").replace("top_k: [1, 8]", "top_k: [1]"))
    proc = cli("validate", str(spec), timeout=180)
    assert not marker.exists()  # the checkpoint's code never ran
    assert "[y/N]" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert proc.returncode == 2 and "custom code" in proc.stderr
    assert all(line.startswith(str(spec)) for line in proc.stderr.strip().splitlines())  # one line per problem


def test_the_phase1_cache_cannot_run_pickled_code(tmp_path):
    import torch

    from flexvlm_ray.tiny.train import load_phase1_cache
    marker = tmp_path / "pickled-code-ran"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    cache = tmp_path / "phase1.pt"
    with open(cache, "wb") as handle:
        pickle.dump({"key": Evil()}, handle)
    assert load_phase1_cache(cache, device="cpu") == {}
    assert not marker.exists()
    torch.save({"key": {"seed": 1}, "model": {"w": torch.ones(2)}}, cache)
    assert load_phase1_cache(cache, device="cpu")["key"] == {"seed": 1}  # a real cache still loads
