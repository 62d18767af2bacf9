"""launch / resume / status: spec -> run folder -> Ray -> stored rows."""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from flexvlm_ray.run.strategies import strategy_of
from flexvlm_ray.spec.expand import WorkUnit, expand
from flexvlm_ray.spec.load import SpecError, load_spec, load_spec_text
from flexvlm_ray.spec.schema import SweepSpec
from flexvlm_ray.store.lock import RunLock, holder
from flexvlm_ray.store.schema import SCHEMA_VERSION
from flexvlm_ray.store.writer import RunStore, StoreError, is_disk_full, warn

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MIN_FREE_BYTES = 64 * 2**20  # a run does not start on a disk with less room than this


class RunWriteFailed(RuntimeError):
    """The run stopped part-way because a write failed (e.g. the disk filled up); what is stored is
    consistent and resumable."""

    def __init__(self, message: str, *, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


def check_run_id(run_id: str) -> str:
    """A run id is one folder name: no path separators, no '..', not absolute."""
    if not RUN_ID_PATTERN.match(run_id) or ".." in run_id:
        raise ValueError(f"--run-id {run_id[:80]!r}: a run id is one folder name of letters, digits, '_', "
                         f"'-' and '.' (at most 128, not starting with '.', no '..')")
    return run_id


@contextlib.contextmanager
def writing(run_dir: Path):
    """Hold the run folder's lock; unwritable output and a full disk become one-line errors."""
    try:
        lock = RunLock(run_dir).acquire()
    except OSError as exc:
        raise ValueError(f"cannot write the run folder {run_dir}: {exc.strerror or exc}; "
                         f"pick another --output") from None
    try:
        if lock.took_over.get("pid"):
            warn(f"{run_dir}: took over the lock of pid {lock.took_over['pid']} on host "
                 f"{lock.took_over.get('host', '?')}, which is gone")
        free = shutil.disk_usage(run_dir).free
        if free < MIN_FREE_BYTES:
            raise ValueError(f"{run_dir}: only {free / 2**20:.0f} MiB free on its disk (a run needs at least "
                             f"{MIN_FREE_BYTES // 2**20} MiB); free some space or pick another --output")
        yield lock
    finally:
        lock.release()


def spec_hash(spec: SweepSpec) -> str:
    """Hash of the spec; a grid spec leaves out the search keys, a spec without control its control
    key, and no spec has its timeouts in it, so runs from before they existed keep their hash."""
    data = spec.model_dump(mode="json")
    data.pop("timeouts", None)  # limits change nothing that is measured
    if spec.search == "grid":
        data.pop("search", None)
        data.pop("tune", None)
    if spec.control is None:
        data.pop("control", None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def frozen_spec_text(spec: SweepSpec, *, source: str, overrides: Sequence[str]) -> str:
    header = f"# frozen copy of {source}" + (f" with --set {' '.join(overrides)}" if overrides else "")
    return header + "\n" + yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def default_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


class RunInterrupted(Exception):
    """Ctrl-C during a run; ``run_dir`` holds what was stored, ``resumable`` whether --resume applies."""

    def __init__(self, run_dir: Path, *, resumable: bool) -> None:
        super().__init__(f"interrupted: {run_dir}")
        self.run_dir, self.resumable = run_dir, resumable


def preflight(*, spec: SweepSpec, num_gpus: Optional[int], address: Optional[str]) -> None:
    """Checks of the machine and the cluster that need no Ray; ValueError with one line."""
    from flexvlm_ray.run.cluster import check_reachable, detected_gpus

    if address and num_gpus:
        raise ValueError("--num-gpus sets the size of a local Ray cluster that launch starts; with --address the "
                         "sweep uses every GPU of the existing cluster (one worker each); drop --num-gpus")
    if address:
        check_reachable(address)
    elif spec.model.device == "cuda" and detected_gpus() == 0:
        import torch

        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"model.device: cuda, but this machine has no usable CUDA GPU (torch {torch.__version__}, "
                         f"{build}); use device: auto (runs on the CPU here) or --address a cluster with GPUs")


def launch(*, spec_path: str, overrides: Sequence[str] = (), num_gpus: Optional[int] = None,
           address: Optional[str] = None, output: str = "results", run_id: Optional[str] = None,
           dashboard: bool = False, progress: bool = True, prefetch: int = 1,
           max_units: Optional[int] = None):
    """Validate, connect Ray, then create the run folder under its lock and run (a spec, machine or
    cluster problem leaves no folder behind; one driver at a time per run folder)."""
    from flexvlm_ray.run.cluster import check_num_gpus, connect

    spec = load_spec(spec_path, overrides=overrides, max_units=max_units)
    run_id = check_run_id(run_id or default_run_id())
    preflight(spec=spec, num_gpus=num_gpus, address=address)
    check_num_gpus(num_gpus=num_gpus, address=address)
    run_dir = Path(output) / spec.name / run_id
    if (run_dir / "manifest.json").exists():  # checked again under the lock, by RunStore.create
        raise FileExistsError(f"{run_dir} already holds a run; resume it with "
                              f"`flexvlm-ray launch --resume {run_dir}` or pick another --run-id")
    ray_start_s = _timed_connect(num_gpus=num_gpus, address=address, dashboard=dashboard)
    with writing(run_dir):
        strategy = strategy_of(spec)
        units = strategy.units(spec)
        store = RunStore(run_dir)
        store.create(spec_text=frozen_spec_text(spec, source=spec_path, overrides=overrides),
                     spec_hash=spec_hash(spec), units=units, run_id=run_id)
        if strategy.manifest_fields(spec):
            store.update_manifest(**strategy.manifest_fields(spec))
        with _interruptible(store.root, resumable=strategy.resumable):
            return store.root, _execute(spec=spec, units=units, store=store, run_id=run_id, num_gpus=num_gpus,
                                        address=address, dashboard=dashboard, progress=progress,
                                        prefetch=prefetch, ray_start_s=ray_start_s)


def resume(*, run_dir: str, num_gpus: Optional[int] = None, address: Optional[str] = None,
           dashboard: bool = False, progress: bool = True, prefetch: int = 1):
    from flexvlm_ray.run.cluster import check_num_gpus, connect

    store = RunStore(run_dir)
    store.manifest()  # not a run folder / a damaged manifest: refused before taking the lock
    check_num_gpus(num_gpus=num_gpus, address=address)
    with writing(store.root):
        spec, units = check_resumable(store)
        preflight(spec=spec, num_gpus=num_gpus, address=address)
        ray_start_s = _timed_connect(num_gpus=num_gpus, address=address, dashboard=dashboard)
        store.remove_partial_writes()  # safe: we hold the lock, so no live writer has a write in flight
        try:
            stored_units(store)
        except StoreError as exc:
            warn(f"{exc}; rewriting it")
            store.write_units(units)
        store.verify_parts(move_aside=True)
        manifest = store.manifest()
        with _interruptible(store.root, resumable=True):
            return store.root, _execute(spec=spec, units=units, store=store, run_id=manifest["run_id"],
                                        num_gpus=num_gpus, address=address, dashboard=dashboard,
                                        progress=progress, prefetch=prefetch, ray_start_s=ray_start_s)


def _timed_connect(*, num_gpus: Optional[int], address: Optional[str], dashboard: bool) -> float:
    """Connect Ray (start a local cluster or join one); the seconds it took."""
    from flexvlm_ray.run.cluster import connect

    started = time.perf_counter()
    connect(num_gpus=num_gpus, address=address, dashboard=dashboard)
    return time.perf_counter() - started


@contextlib.contextmanager
def _interruptible(run_dir: Path, *, resumable: bool):
    """Ctrl-C -> RunInterrupted naming the run folder; a SweepAborted learns its run folder."""
    from flexvlm_ray.run.scheduler import SweepAborted

    try:
        yield
    except KeyboardInterrupt:
        raise RunInterrupted(Path(run_dir), resumable=resumable) from None
    except SweepAborted as exc:
        exc.run_dir = Path(run_dir)
        raise


def stored_units(store: RunStore) -> list[WorkUnit]:
    """RUN_DIR/units.jsonl read back into typed units (model and measure validated); StoreError when
    it is damaged or a line is not a work unit this code reads."""
    lines = store.units()
    try:
        return [WorkUnit.from_dict(line) for line in lines]
    except (TypeError, ValueError, KeyError) as exc:   # pydantic's ValidationError is a ValueError
        problem = " ".join(str(exc).split())[:200]
        raise StoreError(f"{store.root / 'units.jsonl'} is damaged (a line is not a work unit: {problem}); "
                         f"`flexvlm-ray launch --resume {store.root}` rewrites it from spec.yaml") from None


def check_resumable(store: RunStore) -> tuple[SweepSpec, list[WorkUnit]]:
    """The frozen spec and its units, if this code still expands them to the same unit ids."""
    manifest = store.manifest()
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise SpecError([f"{store.root}: written with row schema v{manifest['schema_version']}, "
                         f"this code writes v{SCHEMA_VERSION}; start a new run instead of resuming"])
    from flexvlm_ray.spec.load import MAX_UNITS

    # a run launched with --max-units above the default cap resumes without the flag
    spec = load_spec_text(store.spec_text(), source=str(store.root / "spec.yaml"),
                          max_units=max(MAX_UNITS, len(manifest["unit_ids"])))
    if not strategy_of(spec).resumable:
        raise SpecError([f"{store.root}: a search: {spec.search} run cannot be resumed (the searcher's state is "
                         f"not stored); launch the spec again under a new --run-id"])
    if spec_hash(spec) != manifest["spec_hash"]:
        raise SpecError([f"{store.root}/spec.yaml, or what this code reads from it (a setting added since, with "
                         f"its default), changed since the run started (hash {spec_hash(spec)} != "
                         f"{manifest['spec_hash']}); start a new run"])
    units = expand(spec)
    if [u.unit_id for u in units] != manifest["unit_ids"]:
        raise SpecError([f"{store.root}: this code expands the spec to other work units than the run "
                         f"holds (the expansion or unit content changed); start a new run"])
    return spec, units


def _execute(*, spec: SweepSpec, units: list[WorkUnit], store: RunStore, run_id: str,
             num_gpus: Optional[int], address: Optional[str], dashboard: bool, progress: bool,
             prefetch: int, ray_start_s: float = 0.0):
    import ray

    from flexvlm_ray.run.cluster import connect
    from flexvlm_ray.run.metrics import LiveMetrics

    connect(num_gpus=num_gpus, address=address, dashboard=dashboard)
    store.update_manifest(status="running")
    strategy = strategy_of(spec)
    driver = strategy.driver(spec=spec, store=store, run_id=run_id, model=spec.model, seed=spec.seed,
                             prefetch=prefetch, progress=progress, metrics=LiveMetrics(sweep=spec.name),
                             unit_timeout_s=spec.timeouts.unit_s, worker_start_timeout_s=spec.timeouts.worker_start_s)
    with interruption_recorded(store):
        summary = strategy.run(driver=driver, spec=spec, units=units)
    finishing = time.perf_counter()
    env = driver_env(ray_version=ray.__version__)
    previous = json.loads((store.root / "env.json").read_text()) if (store.root / "env.json").exists() else {}
    env["workers"] = summary.workers or previous.get("workers", [])
    env["sessions"] = previous.get("sessions", []) + [{
        "started_units": summary.total - summary.skipped, "done": summary.done, "failed": summary.failed,
        "wall_s": round(summary.wall_s, 3), "busy_s": round(summary.busy_s, 3),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat()}]
    with interruption_recorded(store):
        store.write_env(env)
        store.compact()
        status = run_status(store.root)
        store.update_manifest(status="complete" if status["pending"] == 0 and status["failed"] == 0
                              else "incomplete")
    strategy.finished(driver=driver, store=store)
    if summary.walltime:
        summary.breakdown = write_walltime(store.root, driver={
            "ray_start_s": ray_start_s, "workers_start_s": summary.workers_start_s, "units_s": summary.wall_s,
            "finish_s": time.perf_counter() - finishing}, workers=summary.walltime)
    return summary


WALLTIME_FILE = "walltime.json"


def write_walltime(run_dir: Path, *, driver: dict[str, float], workers: dict[str, Any],
                   replace_last: bool = False) -> dict[str, Any]:
    """The run's wall-time breakdown (``measure.walltime.run_breakdown``) written to RUN_DIR/walltime.json:
    the latest session at the top level, every session (a resumed run has several) in ``sessions``, oldest
    first; ``replace_last``: this breakdown updates the last session (the launch command adds its analysis)."""
    from flexvlm_ray.measure.walltime import breakdown_line, run_breakdown
    from flexvlm_ray.store.writer import atomic_write_json

    breakdown = run_breakdown(driver=driver, workers=workers)
    breakdown["line"] = breakdown_line(breakdown)
    path = Path(run_dir) / WALLTIME_FILE
    previous = json.loads(path.read_text()).get("sessions", []) if path.exists() else []
    if replace_last:
        previous = previous[:-1]
    atomic_write_json(path, {**breakdown, "sessions": previous + [breakdown]})
    return breakdown


@contextlib.contextmanager
def interruption_recorded(store: RunStore):
    """Mark the manifest ``interrupted`` when the block raises; an OSError (a full disk, a folder
    that became unwritable) becomes a RunWriteFailed naming the run folder to resume."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            store.update_manifest(status="interrupted")
        if isinstance(exc, OSError):
            what = "the disk is full" if is_disk_full(exc) else (exc.strerror or str(exc))
            raise RunWriteFailed(f"writing {store.root} failed: {what}; the stored units are consistent",
                                 run_dir=store.root) from None
        raise


def driver_env(*, ray_version: str) -> dict[str, Any]:
    import torch
    import transformers

    import flexvlm_ray
    return {"host": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "flexvlm_ray": flexvlm_ray.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__, "ray": ray_version,
            "git_sha": git_sha(), "command": " ".join(sys.argv)}


def git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Done / failed / pending units, rows, per-GPU counts, failures by error type."""
    store = RunStore(run_dir)
    manifest = store.manifest()
    unit_ids = manifest["unit_ids"]
    read = store.read_rows(columns=["unit_id", "gpu_name", "worker"])
    done = set(read.done)
    failures = {u: r for u, r in store.failure_records().items() if u not in done}
    per_gpu, per_worker = Counter(), Counter()
    first = read.table.group_by("unit_id", use_threads=False).aggregate(
        [("gpu_name", "first"), ("worker", "first")])
    for gpu, worker in zip(first.column("gpu_name_first").to_pylist(), first.column("worker_first").to_pylist()):
        per_gpu[gpu] += 1
        per_worker[worker] += 1
    status = manifest.get("status")
    if status == "running" and holder(store.root) is None:
        status = "interrupted"  # no live driver holds the lock: it was killed
    return {"run_dir": str(store.root), "sweep": manifest.get("sweep"), "run_id": manifest["run_id"],
            "status": status, "units": len(unit_ids), "done": len(done),
            "failed": len(failures), "pending": len(unit_ids) - len(done) - len(failures),
            "corrupt": len(read.corrupt), "stray_files": len(read.stray), "rows": read.table.num_rows,
            "units_per_gpu": dict(per_gpu), "units_per_worker": dict(per_worker),
            "failures_by_type": dict(Counter(r.get("error_type", "?") for r in failures.values())),
            "failures": [{"unit_id": u, "error_type": r.get("error_type"), "message": r.get("message", "")[:300]}
                         for u, r in failures.items()]}
