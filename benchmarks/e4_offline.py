"""Cross-validated replay of the E4 policies on a closed-loop run's TRAINING rows, or on a grid run over
a training split (no model, no Ray): flexvlm_ray.control.offline. A closed-loop run's held-out requests
are never read, so policy and guardrail settings compared here are chosen without the test requests.

    PYTHONPATH=. python benchmarks/e4_offline.py RUN_DIR [--folds 2] [--guards 0.9,s1.0] [--spread 0.95]

Prints, per workload, policy and budget fraction: violation rate, quality retained (vs the full
configuration on the same requests) and P95 latency / budget; and the issue-17 targets per guarded policy.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guards", default=None, help="guardrails to compare, comma separated: 0.9 (estimate <= "
                        "budget x 0.9) or s1.0 (calibrated: estimate x spread <= budget x 1.0); default: the run's")
    parser.add_argument("--spread", type=float, default=0.95, help="quantile of measured / estimated latency the "
                        "calibrated guardrails use")
    parser.add_argument("--spread-per", choices=("task", "config"), default=None, help="default: the run's")
    parser.add_argument("--lut-prior", type=float, default=None, help="default: the run's (control.lut_prior)")
    parser.add_argument("--lut-pooled", type=int, choices=(0, 1), default=None,
                        help="default: the run's (control.lut_pooled_spread)")
    parser.add_argument("--policies", default="full,static,flops_proxy,random,lut,learned")
    parser.add_argument("--guarded", default="lut,learned")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--csv", help="write the replayed rows here")
    args = parser.parse_args()

    from flexvlm_ray.control.build import training_requests
    from flexvlm_ray.control.estimate import Guardrail
    from flexvlm_ray.control.offline import cross_validate, summarize
    from flexvlm_ray.control.space import ConfigSpace
    from flexvlm_ray.spec.expand import knob_grid
    from flexvlm_ray.spec.load import load_spec
    from flexvlm_ray.store.reader import load_frame

    from flexvlm_ray.spec.schema import ControlSpec

    run = Path(args.run_dir)
    spec = load_spec(run / "spec.yaml")
    rows = load_frame(run)
    if spec.control is not None:       # a closed-loop run: its training rows only
        control = spec.control
        rows = rows[rows["role"] == "train"]
        datasets = [{"name": ds.name, "split": control.train_split, "num_samples": control.train_samples,
                     "path": ds.path} for ds in spec.datasets]
    else:                              # a grid run (over training requests): every row, the control defaults
        control = ControlSpec(policies=["full"])
        datasets = [{"name": ds.name, "split": ds.split, "num_samples": ds.num_samples, "path": ds.path}
                    for ds in spec.datasets]
    requests = training_requests(datasets=datasets, seed=spec.seed)
    options = {"static": {"quantile": control.quantile},
               "lut": {"quantile": control.quantile, "min_cell": control.lut_min_cell,
                       "prior": control.lut_prior if args.lut_prior is None else args.lut_prior,
                       "pooled_spread": control.lut_pooled_spread if args.lut_pooled is None else bool(args.lut_pooled)},
               "learned": {"hidden": control.hidden, "epochs": args.epochs or control.epochs}}
    guards = (args.guards or f"{control.margin}").split(",")
    guardrails = [Guardrail(margin=float(g.lstrip("s")), calibrated=g.startswith("s")) for g in guards]
    replayed = cross_validate(rows=rows, requests=requests, space=ConfigSpace.of(knob_grid(spec)),
                              policies=[p for p in args.policies.split(",") if p], guarded=args.guarded.split(","),
                              guardrails=guardrails, folds=args.folds, seed=args.seed, options=options,
                              guard_quantile=args.spread, spread_per=args.spread_per or control.spread_per)
    if args.csv:
        replayed.to_csv(args.csv, index=False)
    table = summarize(replayed)
    pd.set_option("display.width", 200)
    for dataset, part in table.groupby("dataset"):
        print(f"## {dataset}: retained / violation per budget fraction")
        wide = part.assign(cell=[f"{100 * r:4.0f}% / {100 * v:3.0f}%" for r, v in zip(part["retained"], part["violation"])])
        print(wide.pivot(index="policy", columns="budget_fraction", values="cell").to_string())
    print(json.dumps({"guards": guards, "spread_quantile": args.spread, "spread_per": args.spread_per or control.spread_per,
                      "lut": options["lut"], "folds": args.folds}))


if __name__ == "__main__":
    main()
