"""Orchestration overhead of the Ray driver, with the simulated family (sleeps, no model).

Every unit sleeps a known time (default 0.5 s: 15 decode steps of --unit-s/15), so the ideal
wall time of N workers is the measured busy time / N. For 1, 2, 4, 8 logical GPUs:

    overhead per unit = (workers x driver wall - sum of worker busy time) / units
    efficiency        = sum of worker busy time / (workers x driver wall)

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
            "efficiency": summary.busy_s / (workers * summary.wall_s)}


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
    print(f"{'workers':>7} {'units':>5} {'wall_s':>7} {'busy_s':>7} {'ideal_s':>7} {'ovh_ms/unit':>11} {'efficiency':>10} {'start+run_s':>11}")
    for r in results:
        print(f"{r['workers']:>7} {r['units']:>5} {r['driver_wall_s']:>7.2f} {r['busy_s']:>7.2f} "
              f"{r['busy_s'] / r['workers']:>7.2f} {r['overhead_ms_per_unit']:>11.1f} {r['efficiency']:>10.3f} "
              f"{r['launch_total_s']:>11.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
