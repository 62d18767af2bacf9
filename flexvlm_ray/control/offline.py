"""Policies evaluated on profiled rows, without the model: k-fold cross-validation over training requests.

The training grid of a closed-loop run (every configuration on every training request) says what any
policy would have measured on those requests. ``cross_validate`` splits the requests into ``folds``
(per workload), fits a Controller on the other folds' rows and replays each held-out request at every
budget fraction: the configuration the policy picks, then that configuration's measured latency and
quality on the request (``RowEnvironment.step``). Budgets are fractions of the full configuration's
P50 over the held-out fold, as E4's are of the reference (held-out) P50. So policy and guardrail
settings can be compared, and chosen, on training requests only: the closed loop's held-out requests
stay untouched.

What it cannot see: the host changing speed between the training phase and the control phase (every
number here comes from one phase's measurements), and warm-up effects of switching configurations
per request.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from flexvlm_ray.control.build import build_controller
from flexvlm_ray.control.env import RowEnvironment
from flexvlm_ray.control.estimate import Guardrail, config_column
from flexvlm_ray.control.features import Request
from flexvlm_ray.control.policies import Controller, policy_label
from flexvlm_ray.control.space import ConfigSpace

DEFAULT_FRACTIONS = (0.35, 0.5, 0.7, 0.85, 1.0)


def folds_of(requests: Sequence[Request], *, folds: int, seed: int = 0) -> list[list[Request]]:
    """``folds`` disjoint groups of requests, each workload's requests dealt round-robin after a shuffle."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    rng = np.random.default_rng(seed)
    out: list[list[Request]] = [[] for _ in range(folds)]
    for dataset in sorted({r.dataset for r in requests}):
        mine = [r for r in requests if r.dataset == dataset]
        for i, j in enumerate(rng.permutation(len(mine))):
            out[i % folds].append(mine[j])
    return out


def guard_label(name: str, guardrail: Optional[Guardrail]) -> str:
    """'lut', or with its guardrail's settings: 'lut+guard(0.9)', 'lut+guard(p95 x 1.0)' (calibrated)."""
    if guardrail is None:
        return name
    return f"{name}+guard({'spread x ' if guardrail.calibrated else ''}{guardrail.margin:g})"


def replay(*, controller: Controller, env: RowEnvironment, policies: Iterable[tuple[str, Optional[Guardrail]]],
           fractions: Sequence[float] = DEFAULT_FRACTIONS, labels: bool = False) -> pd.DataFrame:
    """One row per (policy, budget fraction, request of ``env``): the configuration chosen and what it
    measured on that request. Budgets: fraction x the full configuration's P50 over ``env`` per workload.
    ``labels``: name guarded policies by their guardrail's settings (``guard_label``), not 'x+guard'."""
    full = env.space.full_index
    p50 = {ds: env.full_p50(dataset=ds) for ds in sorted(set(env.datasets))}
    out = []
    for name, guardrail in policies:
        decide = controller.decider(name, guardrail)
        for fraction in fractions:
            for i, features in enumerate(env.requests):
                r = features.request
                budget = fraction * p50[r.dataset]
                index = decide(r, budget).index
                label = guard_label(name, guardrail) if labels else policy_label(name, guardrail is not None)
                out.append({"dataset": r.dataset, "request": r.request_id, "policy": label,
                            "budget_fraction": fraction, "budget_ms": budget, "config": env.space.keys[index],
                            "latency_ms": float(env.latency[i, index]), "quality": float(env.quality[i, index]),
                            "full_quality": float(env.quality[i, full]),
                            "violated": bool(env.latency[i, index] > budget)})
    return pd.DataFrame(out)


def cross_validate(*, rows: pd.DataFrame, requests: Sequence[Request], space: ConfigSpace, policies: Sequence[str],
                   guarded: Sequence[str] = (), guardrails: Sequence[Guardrail] = (Guardrail(margin=0.9),),
                   folds: int = 2, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                   options: Optional[dict[str, dict[str, Any]]] = None, guard_quantile: Optional[float] = 0.95,
                   spread_per: str = "config", geometry: Optional[dict[str, Any]] = None) -> pd.DataFrame:
    """``replay`` of every held-out fold, each with a Controller fitted on the other folds; ``policies`` run
    without the guardrail, ``guarded`` (a subset) also with each of ``guardrails`` (labelled by
    ``guard_label`` when there are several)."""
    rows = rows[rows["status"] == "ok"].copy()
    if "config" not in rows:
        rows["config"] = config_column(rows)
    out = []
    for k, held_out in enumerate(folds_of(requests, folds=folds, seed=seed)):
        test_ids = {(r.dataset, r.request_id) for r in held_out}
        in_test = pd.Series([(d, s) in test_ids for d, s in zip(rows["dataset"], rows["sample_id"])], index=rows.index)
        train_requests = [r for r in requests if (r.dataset, r.request_id) not in test_ids]
        controller, _ = build_controller(rows=rows[~in_test], requests=train_requests, space=space,
                                         policies=sorted(set(policies) | set(guarded)), seed=seed,
                                         geometry=geometry, options=options, guard_quantile=guard_quantile,
                                         spread_per=spread_per)
        features = {(r.dataset, r.request_id): controller.featurizer.features(r) for r in held_out}
        env = RowEnvironment.from_rows(rows[in_test], requests=features, space=space)
        runs = [(p, None) for p in policies] + [(p, g) for g in guardrails for p in guarded]
        part = replay(controller=controller, env=env, policies=runs, fractions=fractions,
                      labels=len(guardrails) > 1)
        part["fold"] = k
        out.append(part)
    return pd.concat(out, ignore_index=True)


def summarize(replayed: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, policy, budget fraction): requests, violation rate, mean quality, quality retained
    (mean quality / mean quality of the full configuration on the same requests), P95 latency / budget."""
    def one(part: pd.DataFrame) -> pd.Series:
        full = part["full_quality"].mean()
        return pd.Series({"n": len(part), "violation": part["violated"].mean(), "quality": part["quality"].mean(),
                          "retained": part["quality"].mean() / full if full else np.nan,
                          "p95_over_budget": float(np.quantile(part["latency_ms"] / part["budget_ms"], 0.95))})
    return replayed.groupby(["dataset", "policy", "budget_fraction"]).apply(one, include_groups=False).reset_index()
