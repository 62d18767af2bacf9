"""M3 on the CPU: the controller's decision time per policy, outside the worker (no model, no Ray).

Each policy (and each with the guardrail) decides for every held-out request of the controller's
workloads (shapes_vqa and shapes_caption validation samples: their image sizes and prompts) at every
budget fraction of the reference P50, budget-major like an E4 run, ``--rounds`` times; a decision is
timed with perf_counter_ns around the policy's decider (``Controller.decider``, bound once per
policy as the worker does per unit) on a Request built from the sample just before (the worker's
``decision_us``; building the Request is ``request_us``, printed too). Printed per policy: median and P99 microseconds, for the decision path and for
``decide_reference`` (the previous implementation: every feature and estimate, then the policy's
full ranking), and whether the two chose the same configuration every time.

``--between trash`` reads an array (64 MiB by default, ``--trash-mib``) between two decisions, so every decision starts with cold
caches as it does in the worker after a forward pass (the worker's numbers are closer to these).

    PYTHONPATH=. python benchmarks/decision_bench.py
    PYTHONPATH=. python benchmarks/decision_bench.py --between trash --rounds 3
    PYTHONPATH=. python benchmarks/decision_bench.py --controller RUN_DIR/control
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONTROLLER = REPO / "results/reference/cpu-2core-2026-12-03/e4/tiny/control"
FRACTIONS = (0.35, 0.5, 0.7, 0.85, 1.0)


def held_out_samples(datasets: list[str], num_samples: int) -> list:
    """(dataset, sample) of the validation split of each workload."""
    from flexvlm_ray.data import DATASETS

    out = []
    for name in datasets:
        samples = DATASETS.get(name).load(split="validation", num_samples=num_samples, seed=0, path=None)
        out += [(name, s) for s in samples if s.error is None]
    return out


def percentiles(values_ns: list[int]) -> tuple[float, float]:
    us = np.asarray(values_ns, float) / 1e3
    return float(np.median(us)), float(np.quantile(us, 0.99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controller", default=str(DEFAULT_CONTROLLER), help="a saved controller folder")
    parser.add_argument("--samples", type=int, default=96, help="held-out requests per workload")
    parser.add_argument("--rounds", type=int, default=5, help="passes over requests x budgets per policy")
    parser.add_argument("--margin", type=float, default=0.9, help="the guardrail's margin")
    parser.add_argument("--between", choices=("none", "trash"), default="none",
                        help="trash: read --trash-mib MiB between decisions (cold caches, as after a forward pass)")
    parser.add_argument("--trash-mib", type=float, default=64.0, help="what --between trash reads")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    from flexvlm_ray.control import Controller, Guardrail, Request

    folder = Path(args.controller)
    controller = Controller.load(folder)
    p50 = json.loads((folder / "reference.json").read_text())["p50_ms"]
    samples = held_out_samples(sorted(p50), args.samples)
    trash = np.ones(int(args.trash_mib * 2 ** 20) // 8) if args.between == "trash" else None
    guard = Guardrail(args.margin)
    results = {}
    for name in sorted(controller.policies):
        for guardrail in ((None,) if name == "full" else (None, guard)):
            label = f"{name}+guard" if guardrail else name
            timings = {"fast": [], "reference": [], "request": []}
            fast_path = controller.decider(name, guardrail)

            def reference(request, budget, *, policy, guardrail):
                return controller.decide_reference(request, budget, policy=policy, guardrail=guardrail)
            same = True
            for _ in range(args.rounds):
                for fraction in FRACTIONS:
                    for dataset, sample in samples:
                        budget = fraction * p50[dataset]
                        chosen = {}
                        for path in ("fast", "reference"):
                            if trash is not None:
                                trash.sum()
                            started = time.perf_counter_ns()
                            request = Request.of_sample(sample, dataset=dataset)
                            built = time.perf_counter_ns()
                            if path == "fast":
                                chosen[path] = fast_path(request, budget).index
                            else:
                                chosen[path] = reference(request, budget, policy=name, guardrail=guardrail).index
                            timings[path].append(time.perf_counter_ns() - built)
                            if path == "fast":
                                timings["request"].append(built - started)
                        same &= chosen["fast"] == chosen["reference"]
            fast, ref = percentiles(timings["fast"]), percentiles(timings["reference"])
            request = percentiles(timings["request"])
            results[label] = {"median_us": fast[0], "p99_us": fast[1], "reference_median_us": ref[0],
                              "reference_p99_us": ref[1], "request_median_us": request[0],
                              "decisions": len(timings["fast"]), "same_choices": same}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# decision time per policy (us); {len(samples)} requests x {len(FRACTIONS)} budgets x {args.rounds} "
          f"rounds; between decisions: {args.between}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load}")
    print(f"{'policy':18s} {'median':>8s} {'P99':>8s}   {'reference median':>16s} {'P99':>8s}  same choices  "
          f"Request median")
    for label, r in results.items():
        print(f"{label:18s} {r['median_us']:8.1f} {r['p99_us']:8.1f}   {r['reference_median_us']:16.1f} "
              f"{r['reference_p99_us']:8.1f}  {str(r['same_choices']):12s}  {r['request_median_us']:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"between": args.between, "load_average": load, "policies": results},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
