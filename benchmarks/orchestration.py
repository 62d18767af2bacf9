"""Orchestration overhead of the Ray driver, with the simulated family (sleeps, no model).

Every unit sleeps a known time (default 0.5 s: 15 decode steps of --unit-s/15), so the ideal
wall time of N workers is the measured busy time / N. For 1, 2, 4, 8 logical GPUs:

    overhead per unit = (workers x driver wall - sum of worker busy time) / units
    speedup           = driver wall of 1 worker / driver wall of N workers (T1 / TN)
    efficiency        = speedup / N (parallel efficiency)
    busy fraction     = sum of worker busy time / (workers x driver wall)

The busy fraction alone overstates scaling: workers sharing 2 CPU cores stay "busy" while their
sleeps stretch, so busy time grows with N; speedup and efficiency compare wall times.

Driver wall runs from the first unit handed out to the last result stored (worker start-up
is reported separately). Runs on a CPU machine: ``python benchmarks/orchestration.py``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SPEC = """
name: orchestration
experiment: benchmark
model: {{family: simulated, options: {{vision_ms_per_crop: 0, projector_ms_per_crop: 0,
        prefill_ms_per_token: 0, decode_ms_per_token: {step_ms}}}}}
datasets: [{{name: shapes_vqa, num_samples: {units}, shards: {units}}}]
knobs: {{max_new_tokens: 16}}
measure: {{warmup: 0, prefill_hook: false}}
"""


def run_once(*, workers: int, units: int, unit_s: float, root: Path) -> dict:
    import ray

    from flexvlm_ray.run.launch import launch

    spec = root / f"spec_{workers}.yaml"
    spec.write_text(SPEC.format(step_ms=1000 * unit_s / 15, units=units))
    started = time.perf_counter()
    _, summary = launch(spec_path=str(spec), output=str(root), run_id=f"w{workers}", num_gpus=workers,
                        progress=False)
    total = time.perf_counter() - started
    ray.shutdown()
    assert summary.ok and summary.done == units
    return {"workers": workers, "units": units, "unit_s": unit_s, "driver_wall_s": summary.wall_s,
            "busy_s": summary.busy_s, "launch_total_s": total,
            "overhead_ms_per_unit": 1000 * (workers * summary.wall_s - summary.busy_s) / units,
            "busy_fraction": summary.busy_s / (workers * summary.wall_s)}


def add_speedup(results: list[dict]) -> list[dict]:
    """speedup = T1 / TN (driver wall) and efficiency = speedup / N, where a 1-worker run is in ``results``."""
    one = [r for r in results if r["workers"] == 1]
    for r in results:
        r["speedup"] = one[0]["driver_wall_s"] / r["driver_wall_s"] if one else None
        r["efficiency"] = r["speedup"] / r["workers"] if one else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--unit-s", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import os
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            results.append(run_once(workers=workers, units=args.units, unit_s=args.unit_s, root=Path(tmp)))
    add_speedup(results)
    print(f"{'workers':>7} {'units':>5} {'wall_s':>7} {'busy_s':>7} {'ovh_ms/unit':>11} {'speedup':>7} "
          f"{'efficiency':>10} {'busy_frac':>9} {'start+run_s':>11}")
    for r in results:
        speedup = f"{r['speedup']:>7.2f}" if r["speedup"] else f"{'-':>7}"
        eff = f"{r['efficiency']:>10.3f}" if r["efficiency"] else f"{'-':>10}"
        print(f"{r['workers']:>7} {r['units']:>5} {r['driver_wall_s']:>7.2f} {r['busy_s']:>7.2f} "
              f"{r['overhead_ms_per_unit']:>11.1f} {speedup} {eff} {r['busy_fraction']:>9.3f} "
              f"{r['launch_total_s']:>11.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
