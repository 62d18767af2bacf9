"""E6 portability: E3's stage estimator fitted on one model family or GPU type (the source rows), recalibrated
from K rows of another (the target rows), and the guardrail it drives there. No model, no Ray: profiled rows.

Two measurements per draw, both on rows of the target only:

error   E3's transfer protocol, unchanged (``estimator.transfer``): the target's knob configurations split
        (``holdout`` of them held out, unseen by every fit), the estimator fitted on the source rows (of the
        target's training configurations, where the two grids share any), recalibrated
        (``StageEstimator.recalibrate``) on K rows drawn from the target's training configurations; MAPE and
        share within +-10% per stage and for T_total on the target's held-out configurations. Split s uses
        seed + s, row draw r seed + s + 100 r, as ``analysis.e3.transfer_curve``.
guard   the target's requests split in halves per workload (calibration / evaluation, seed + s); K rows drawn
        from the calibration half (seed + s + 100 r) recalibrate the source estimator. On the evaluation half,
        per workload and E4 budget fraction f (of the full configuration's P50 there: the one with the most
        capacity, the slowest of those where several tie), the guarded policy takes, among the configurations whose estimated T_total <= budget x margin
        (``Guardrail.admit``), the one that runs the most model (``analysis.budget``'s capacity proxy, tokens x
        blocks x (1 + top_k): what a quality-seeking policy takes where quality grows with compute; the
        target family's random weights give no quality to rank by, and GPU rows are unscored); none admitted:
        the lowest estimate (as ``Controller.decide``). Where the target's grid varies ``max_new_tokens`` the guard
        decides over the configurations of the largest one (``guard_rows``). Estimates are the estimator on the configuration's
        median inputs over the evaluation requests (``analysis.budget.config_table``, as E3's budget
        enforcement), not E4's per-request input predictions. Its violation count: evaluation rows of that
        configuration whose measured T_total exceeds the budget.

Two reference rules per split in ``guard``: ``native`` (the estimator fitted on all of the target's
calibration-half rows: what profiling the target gives) and ``measured`` (each configuration's measured P50 on
the evaluation half itself: a perfect median estimate, whose violations are the requests' spread around their
configuration's median).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from flexvlm_ray.control.estimate import Guardrail
from flexvlm_ray.estimator import TARGETS, StageEstimator, evaluate, sample_rows, transfer, usable_rows

PORTABILITY_K = (0, 1, 3, 5)
E4_FRACTIONS = (0.35, 0.5, 0.7, 0.85, 1.0)
REFERENCE_RULES = ("native", "measured")


def split_requests(rows: pd.DataFrame, *, seed: int, share: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(calibration, evaluation) rows: per workload, ``share`` of its requests (sample ids, at least one, at most
    all but one) go to calibration, drawn with ``seed``; a request's rows stay together."""
    rng = np.random.default_rng(seed)
    cal_keys = set()
    for dataset in sorted(rows["dataset"].unique()):
        ids = np.array(sorted(rows.loc[rows["dataset"] == dataset, "sample_id"].astype(str).unique()))
        n = min(max(int(round(share * len(ids))), 1), max(len(ids) - 1, 1))
        cal_keys |= {(dataset, s) for s in rng.choice(ids, size=n, replace=False)}
    in_cal = pd.Series([(d, str(s)) in cal_keys for d, s in zip(rows["dataset"], rows["sample_id"])], index=rows.index)
    return rows[in_cal], rows[~in_cal]


def guarded_choice(table: pd.DataFrame, *, estimate: np.ndarray, budget_ms: float, guardrail: Guardrail) -> int:
    """Row position in ``table`` (one workload's configurations) that the guarded policy takes: the most capacity
    (``quality`` column) among admitted configurations, ties to the lower estimate; none admitted: the lowest
    estimate."""
    estimate = np.asarray(estimate, float)
    admitted = guardrail.admit(estimates=estimate, budget_ms=budget_ms)
    if not admitted.any():
        return int(np.argmin(estimate))
    capacity = table["quality"].to_numpy(float)
    candidates = np.flatnonzero(admitted)
    order = np.lexsort((estimate[candidates], -capacity[candidates]))
    return int(candidates[order[0]])


def evaluation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """``analysis.budget.config_table`` of the rows ranked by the capacity proxy (any score dropped)."""
    from flexvlm_ray.analysis.budget import config_table

    table, _ = config_table(rows.drop(columns=[c for c in ("score",) if c in rows]))
    return table


def guard_records(*, table: pd.DataFrame, rows: pd.DataFrame, estimate: np.ndarray, fractions: Sequence[float],
                  guardrail: Guardrail) -> list[dict[str, Any]]:
    """Per workload and budget fraction: the guarded choice under ``estimate`` (one value per table line) and
    its measured violations over ``rows`` (the evaluation rows, with a ``config`` column as the table's)."""
    out = []
    estimate = np.asarray(estimate, float)
    for dataset in sorted(table["dataset"].unique()):
        mask = (table["dataset"] == dataset).to_numpy()
        part, est = table[mask].reset_index(drop=True), estimate[mask]
        most = part["quality"] == part["quality"].max()          # the full configuration: the most capacity
        full_p50 = float(part.loc[most, "lat_p50"].max())
        for f in fractions:
            budget = float(f) * full_p50
            pos = guarded_choice(part, estimate=est, budget_ms=budget, guardrail=guardrail)
            line = part.iloc[pos]
            times = rows.loc[(rows["dataset"] == dataset) & (rows["config"] == line["config"]), "T_total"].to_numpy(float)
            out.append({"dataset": dataset, "budget_fraction": float(f), "budget_ms": budget, "full_p50_ms": full_p50,
                        "config": str(line["config"]), "estimate_ms": float(est[pos]),
                        "admitted_any": bool(guardrail.admit(estimates=est, budget_ms=budget).any()),
                        "violations": int((times > budget).sum()), "requests": int(times.size)})
    return out


def guard_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The target rows the guard decides over: those of the largest ``max_new_tokens`` where the grid varies it
    (E3's calibration grid forces two decode lengths; E4's space has one, and a budget in fractions of the longest
    one's P50 leaves the shorter ones far under it whatever the estimate)."""
    if "max_new_tokens" in rows and rows["max_new_tokens"].nunique() > 1:
        return rows[rows["max_new_tokens"] == rows["max_new_tokens"].max()]
    return rows


def portability_records(*, source: pd.DataFrame, target: pd.DataFrame, pair: str, ks: Sequence[int] = PORTABILITY_K,
                        splits: int = 5, repeats: int = 5, holdout: float = 0.3, margin: float = 1.0,
                        fractions: Sequence[float] = E4_FRACTIONS, seed: int = 0) -> pd.DataFrame:
    """One row per error draw (``kind`` 'error': pair, k, split, repeat, target, mape, within, n) and per guard
    decision (``kind`` 'guard': pair, rule 'K=k' / 'native' / 'measured', k, split, repeat, dataset, budget
    fraction, the choice and its violations); see the module docstring."""
    from flexvlm_ray.analysis.budget import with_keys

    source, target = usable_rows(source), usable_rows(target)
    if source.empty or target.empty:
        raise ValueError("portability needs usable rows on both sides (ok rows with token counts and stage times)")
    guardrail = Guardrail(margin=margin)
    out: list[dict[str, Any]] = []
    for s in range(splits):
        for k in ks:
            for r in range(repeats):
                est, report = transfer(source=source, target=target, k=k, seed=seed + s + 100 * r,
                                       split_seed=seed + s, holdout=holdout)
                for t in TARGETS:
                    out.append({"kind": "error", "pair": pair, "k": int(k), "split": s, "repeat": r, "target": t,
                                "mape": report[t]["mape"], "within": report[t]["within"], "n": report[t]["n"],
                                "fallback": bool(est.meta.get("fallback", False))})
    base = StageEstimator.fit(source)
    keyed = guard_rows(with_keys(target))
    for s in range(splits):
        cal, ev = split_requests(keyed, seed=seed + s)
        table = evaluation_table(ev)
        rules: list[tuple[str, int, int, np.ndarray, Optional[StageEstimator]]] = []
        native = StageEstimator.fit(cal)
        rules.append(("native", -1, 0, native.predict(table)["T_total"], native))
        rules.append(("measured", -1, 0, table["lat_p50"].to_numpy(float), None))
        for k in ks:
            for r in range(repeats):
                est = base.recalibrate(sample_rows(cal, k=k, seed=seed + s + 100 * r))
                rules.append((f"K={k}", int(k), r, est.predict(table)["T_total"], est))
        for name, k, r, estimate, est in rules:
            errors = evaluate(est, ev)["T_total"] if est is not None else {"mape": np.nan, "within": np.nan}
            for rec in guard_records(table=table, rows=ev, estimate=estimate, fractions=fractions, guardrail=guardrail):
                out.append({"kind": "guard", "pair": pair, "rule": name, "k": k, "split": s, "repeat": r,
                            "eval_mape": errors["mape"], "eval_within": errors["within"],
                            "fallback": bool(est.meta.get("fallback", False)) if est is not None else False, **rec})
    return pd.DataFrame(out)
