"""launch / resume / status: spec -> run folder -> Ray -> stored rows."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from flexvlm_ray.spec.expand import WorkUnit, expand
from flexvlm_ray.spec.load import SpecError, load_spec, load_spec_text
from flexvlm_ray.spec.schema import SweepSpec
from flexvlm_ray.store.schema import SCHEMA_VERSION
from flexvlm_ray.store.writer import RunStore


def spec_hash(spec: SweepSpec) -> str:
    """Hash of the spec; a grid spec leaves out the search keys (and a spec without control its
    control key), so runs from before they existed keep their hash."""
    data = spec.model_dump(mode="json")
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


def launch(*, spec_path: str, overrides: Sequence[str] = (), num_gpus: Optional[int] = None,
           address: Optional[str] = None, output: str = "results", run_id: Optional[str] = None,
           dashboard: bool = False, progress: bool = True, prefetch: int = 1):
    spec = load_spec(spec_path, overrides=overrides)
    run_id = run_id or default_run_id()
    if spec.search == "tune":
        from flexvlm_ray.run.tune_search import launch_tune

        return launch_tune(spec=spec, spec_text=frozen_spec_text(spec, source=spec_path, overrides=overrides),
                           spec_hash=spec_hash(spec), output=output, run_id=run_id, num_gpus=num_gpus,
                           address=address, dashboard=dashboard, progress=progress, prefetch=prefetch)
    units = expand(spec)
    store = RunStore(Path(output) / spec.name / run_id)
    store.create(spec_text=frozen_spec_text(spec, source=spec_path, overrides=overrides),
                 spec_hash=spec_hash(spec), units=units, run_id=run_id)
    return store.root, _execute(spec=spec, units=units, store=store, run_id=run_id, num_gpus=num_gpus,
                                address=address, dashboard=dashboard, progress=progress, prefetch=prefetch)


def resume(*, run_dir: str, num_gpus: Optional[int] = None, address: Optional[str] = None,
           dashboard: bool = False, progress: bool = True, prefetch: int = 1):
    store = RunStore(run_dir)
    spec, units = check_resumable(store)
    store.remove_partial_writes()
    manifest = store.manifest()
    return store.root, _execute(spec=spec, units=units, store=store, run_id=manifest["run_id"],
                                num_gpus=num_gpus, address=address, dashboard=dashboard,
                                progress=progress, prefetch=prefetch)


def check_resumable(store: RunStore) -> tuple[SweepSpec, list[WorkUnit]]:
    """The frozen spec and its units, if this code still expands them to the same unit ids."""
    manifest = store.manifest()
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise SpecError([f"{store.root}: written with row schema v{manifest['schema_version']}, "
                         f"this code writes v{SCHEMA_VERSION}; start a new run instead of resuming"])
    spec = load_spec_text(store.spec_text(), source=str(store.root / "spec.yaml"))
    if spec.search == "tune":
        raise SpecError([f"{store.root}: a search: tune run cannot be resumed (the searcher's state is not "
                         f"stored); launch the spec again under a new --run-id"])
    if spec_hash(spec) != manifest["spec_hash"]:
        raise SpecError([f"{store.root}/spec.yaml changed since the run started "
                         f"(hash {spec_hash(spec)} != {manifest['spec_hash']}); start a new run"])
    units = expand(spec)
    if [u.unit_id for u in units] != manifest["unit_ids"]:
        raise SpecError([f"{store.root}: this code expands the spec to other work units than the run "
                         f"holds (the expansion or unit content changed); start a new run"])
    return spec, units


def _execute(*, spec: SweepSpec, units: list[WorkUnit], store: RunStore, run_id: str,
             num_gpus: Optional[int], address: Optional[str], dashboard: bool, progress: bool,
             prefetch: int):
    import ray

    from flexvlm_ray.run.cluster import connect
    from flexvlm_ray.run.metrics import LiveMetrics
    from flexvlm_ray.run.scheduler import SweepDriver

    connect(num_gpus=num_gpus, address=address, dashboard=dashboard)
    store.update_manifest(status="running")
    common = dict(store=store, run_id=run_id, model=spec.model.model_dump(), seed=spec.seed,
                  prefetch=prefetch, progress=progress, metrics=LiveMetrics(sweep=spec.name))
    if spec.control is not None:   # a closed-loop run (E4): train / reference units, then the policies
        from flexvlm_ray.run.closed_loop import ClosedLoopDriver

        driver = ClosedLoopDriver(spec=spec, **common)
    else:
        driver = SweepDriver(**common)
    try:
        summary = driver.run(units=units, gpu_types=spec.gpu_types)
    except BaseException:
        store.update_manifest(status="interrupted")
        raise
    env = driver_env(ray_version=ray.__version__)
    previous = json.loads((store.root / "env.json").read_text()) if (store.root / "env.json").exists() else {}
    env["workers"] = summary.workers or previous.get("workers", [])
    env["sessions"] = previous.get("sessions", []) + [{
        "started_units": summary.total - summary.skipped, "done": summary.done, "failed": summary.failed,
        "wall_s": round(summary.wall_s, 3), "busy_s": round(summary.busy_s, 3),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat()}]
    store.write_env(env)
    status = run_status(store.root)
    store.update_manifest(status="complete" if status["pending"] == 0 and status["failed"] == 0
                          else "incomplete")
    return summary


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
    import pyarrow.parquet as pq

    store = RunStore(run_dir)
    manifest = store.manifest()
    unit_ids = manifest["unit_ids"]
    done = store.done_ids() & set(unit_ids)
    failures = {u: r for u, r in store.failure_records().items() if u not in done}
    rows, per_gpu, per_worker = 0, Counter(), Counter()
    for path in store.part_paths(done):
        table = pq.read_table(path, columns=["gpu_name", "worker"])
        rows += table.num_rows
        if table.num_rows:
            per_gpu[table.column("gpu_name")[0].as_py()] += 1
            per_worker[table.column("worker")[0].as_py()] += 1
    return {"run_dir": str(store.root), "sweep": manifest.get("sweep"), "run_id": manifest["run_id"],
            "status": manifest.get("status"), "units": len(unit_ids), "done": len(done),
            "failed": len(failures), "pending": len(unit_ids) - len(done) - len(failures), "rows": rows,
            "units_per_gpu": dict(per_gpu), "units_per_worker": dict(per_worker),
            "failures_by_type": dict(Counter(r.get("error_type", "?") for r in failures.values())),
            "failures": [{"unit_id": u, "error_type": r.get("error_type"), "message": r.get("message", "")[:300]}
                         for u, r in failures.items()]}
