"""Run a list of sweeps in this process on one model worker, without Ray: one model load and one
burn-in for the whole list, so that a short GPU session spends its time measuring.

    python3 benchmarks/run_sweeps.py LIST --output DIR [--deadline-s S] [--set KEY=VALUE ...] [--cpu-check]

LIST has one sweep a line, ``SPEC RUN_ID [--set KEY=VALUE ...]`` ('#' starts a comment). Each run folder
is the one ``flexvlm-ray launch`` writes (spec.yaml, manifest.json, units.jsonl, parts/, env.json,
analysis/): every unit goes through the same ``ModelWorker.run`` a Ray worker calls, the parts are
written with ``RunStore`` exactly as the scheduler does, and env.json says that the driver was this
script (``driver``). Sweeps with the same model section and seed share the worker (its adapter stays
loaded, its burn-in runs once: ``measure.burn_in_s``). A run folder that exists is continued (its done
units are skipped); ``flexvlm-ray launch --resume RUN_DIR`` continues it as well.

``--deadline-s``: no unit starts after that many seconds from the start (the run is left 'incomplete'
and resumable); ``--set`` overrides apply to every line after its own; ``--cpu-check`` adds each sweep's
'# cpu:' header overrides last (the tiny model, few samples), to check a list on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent


def parse_list(path: Path) -> list[tuple[str, str, list[str]]]:
    """(spec path, run id, overrides) per line of ``path``."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if len(words) < 2:
            raise SystemExit(f"{path}:{number}: expected 'SPEC RUN_ID [--set KEY=VALUE ...]'")
        spec, run_id, rest = words[0], words[1], words[2:]
        if len(rest) % 2 or any(flag != "--set" for flag in rest[::2]):
            raise SystemExit(f"{path}:{number}: after SPEC RUN_ID only '--set KEY=VALUE' pairs may follow")
        entries.append((spec, run_id, rest[1::2]))
    return entries


def cpu_overrides(spec_path: str) -> list[str]:
    """The overrides of the sweep's '# cpu:' header line ([] where it has none)."""
    for line in Path(spec_path).read_text().splitlines():
        if line.startswith("# cpu:"):
            return [part.strip() for part in line.removeprefix("# cpu:").split("--set") if part.strip()]
    return []


class Workers:
    """One ModelWorker per (model section, seed), kept for the whole list."""

    def __init__(self) -> None:
        self.workers: dict[str, object] = {}

    def get(self, *, model, seed: int):
        """``model``: the spec's ModelSpec."""
        from flexvlm_ray.run.worker import ModelWorker

        key = json.dumps({"model": model.model_dump(mode="json"), "seed": seed}, sort_keys=True)
        if key not in self.workers:
            started = time.perf_counter()
            self.workers[key] = ModelWorker(model=model, seed=seed, name=f"worker-{len(self.workers)}",
                                            cpu_threads=os.cpu_count() or 1)
            print(f"worker ready: {model.family}:{model.preset} ({model.backend}) "
                  f"in {time.perf_counter() - started:.1f} s", flush=True)
        return self.workers[key]


def run_one(*, spec_path: str, run_id: str, overrides: list[str], output: Path, workers: Workers,
            deadline: Optional[float]) -> Optional[Path]:
    """Run (or continue) one sweep; its folder, or None where the spec could not be used."""
    from flexvlm_ray.run.launch import check_run_id, driver_env, frozen_spec_text, run_status, spec_hash, writing
    from flexvlm_ray.spec.expand import expand
    from flexvlm_ray.spec.load import SpecError, load_spec
    from flexvlm_ray.store.writer import RunStore

    try:
        spec = load_spec(spec_path, overrides=overrides)
    except SpecError as exc:
        print(f"SPEC ERROR {spec_path}: {exc}", flush=True)
        return None
    if spec.search != "grid" or spec.control is not None:
        print(f"SKIPPED {spec_path}: only grid sweeps without control run here (use flexvlm-ray launch)", flush=True)
        return None
    units = expand(spec)
    run_dir = output / spec.name / check_run_id(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    with writing(run_dir):
        store = RunStore(run_dir)
        if (run_dir / "manifest.json").exists():
            if store.manifest()["unit_ids"] != [u.unit_id for u in units]:
                print(f"SKIPPED {run_dir}: holds other units than this spec expands to", flush=True)
                return None
            done = store.done_ids()
        else:
            store.create(spec_text=frozen_spec_text(spec, source=spec_path, overrides=overrides),
                         spec_hash=spec_hash(spec), units=units, run_id=run_id)
            done = set()
        store.update_manifest(status="running")
        worker = workers.get(model=units[0].model, seed=spec.seed)
        started, busy, ran, failed = time.perf_counter(), 0.0, 0, 0
        for unit in units:
            if unit.unit_id in done:
                continue
            if deadline is not None and time.monotonic() > deadline:
                print(f"deadline: {run_dir} stops before unit {unit.index} (resumable)", flush=True)
                break
            result = worker.run(unit.to_dict(), run_id)
            busy += result["busy_s"]
            if result["ok"]:
                store.write_part(unit.unit_id, result["table"])
                ran += 1
            else:
                store.write_failure(unit.unit_id, result["failure"])
                failed += 1
                print(f"unit {unit.index} failed: {result['failure'].get('error_type')}: "
                      f"{str(result['failure'].get('message', ''))[:300]}", flush=True)
        try:
            import ray
            ray_version = ray.__version__
        except ImportError:
            ray_version = None
        previous = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").exists() else {}
        env = {**driver_env(ray_version=ray_version), "driver": "benchmarks/run_sweeps.py (in-process, no Ray)",
               "workers": [worker.env()],
               "sessions": previous.get("sessions", []) + [{
                   "started_units": ran + failed, "done": ran, "failed": failed,
                   "wall_s": round(time.perf_counter() - started, 3), "busy_s": round(busy, 3),
                   "finished": dt.datetime.now(dt.timezone.utc).isoformat()}]}
        store.write_env(env)
        store.compact()
        status = run_status(run_dir)
        complete = status["pending"] == 0 and status["failed"] == 0
        store.update_manifest(status="complete" if complete else "incomplete")
    print(f"run: {run_dir}: {status['done']}/{status['units']} units, {status['rows']} rows, "
          f"{status['failed']} failed, {time.perf_counter() - started:.1f} s", flush=True)
    return run_dir


def analyze(run_dir: Path) -> None:
    from flexvlm_ray.analysis.registry import analyze_run
    from flexvlm_ray.analysis.summary import format_summary
    from flexvlm_ray.store.reader import load_frame

    try:
        rows = load_frame(run_dir)
        print(format_summary(rows[rows["status"] == "ok"]), flush=True)
        started = time.perf_counter()
        written = analyze_run(run_dir)
        print(f"analysis: {len(written)} files in {run_dir / 'analysis'} ({time.perf_counter() - started:.1f} s)",
              flush=True)
    except Exception as exc:  # the rows are kept; `flexvlm-ray analyze RUN_DIR` can redo it
        print(f"ANALYSIS FAILED {run_dir}: {type(exc).__name__}: {exc}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("list", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--deadline-s", type=float, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpu-check", action="store_true")
    parser.add_argument("--no-analyze", action="store_true")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline_s if args.deadline_s is not None else None
    workers = Workers()
    problems = 0
    for spec_path, run_id, overrides in parse_list(args.list):
        if deadline is not None and time.monotonic() > deadline:
            print(f"deadline: {spec_path} {run_id} not started", flush=True)
            problems += 1
            continue
        overrides = [*overrides, *args.overrides, *(cpu_overrides(spec_path) if args.cpu_check else [])]
        print(f"--- {spec_path} {run_id} {' '.join('--set ' + o for o in overrides)} "
              f"({dt.datetime.now().strftime('%H:%M:%S')})", flush=True)
        run_dir = run_one(spec_path=spec_path, run_id=run_id, overrides=overrides, output=args.output,
                          workers=workers, deadline=deadline)
        if run_dir is None:
            problems += 1
            continue
        if not args.no_analyze:
            analyze(run_dir)
        if json.loads((run_dir / "manifest.json").read_text()).get("status") != "complete":
            problems += 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
