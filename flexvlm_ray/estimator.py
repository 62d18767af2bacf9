"""E3: a stage-aware latency estimator, fitted from sweep rows, recalibrated across GPUs.

Each stage is a non-negative linear model of physically motivated features (ms):

    T_vision_encoder = c0 + c1 * crops
    T_projector      = c0 + c1 * crops
    T_LLM_prefill    = c0 + cb * b + c1 * T + c2 * T*b + c3 * T*b*k + c4 * T^2*b
    T_LLM_decode     = c0 + c1 * n + c2 * n*b + c3 * n*b*k + c4 * n*ctx*b

with T the input tokens (vision + text), b the active decoder blocks, k the experts per
token (top_k), n = output tokens - 1 (decode steps after the prefill's first token) and
ctx = T + output tokens / 2 (the mean context a decode step attends to). The T*b term is
attention/dense work per block, T*b*k the routed experts, T^2*b the attention score matrix,
c1 the per-token work outside the blocks (embedding, LM head), c0 the fixed launch cost and
cb the per-block launch cost of prefill (dominant on a launch-bound runtime).
Coefficients come from non-negative least squares on the relative error (each row weighted
by 1 / its time), so small and large configurations count alike. ``T_total`` is the sum of
the stages (the engine measures the stages on one timeline, so the rows' T_total is too).

Recalibration to another GPU type keeps the feature shape and multiplies each stage by one
factor, exp(w * median log(measured / predicted)) over the K rows of the new GPU. The shrinkage w
is chosen per stage from those K rows (``choose_shrinkage``): 1 where the log ratios differ from 0
beyond their noise (one-sample t-test at 5% over the four stages, Bonferroni), else 0, the raw transfer;
from K=3 on, factors that do not also predict T_total better than the raw transfer in
leave-one-configuration-out over the K rows (paired t-test at 5%) are dropped (the raw transfer). K=0 is the raw transfer
(factors 1); K=1 cannot tell a factor from noise and falls back to it too. A factor from a few noisy
rows of a GPU as fast as the source would only add their noise, which is what made K=5 worse than K=0.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from flexvlm_ray.knobs.base import KNOB_NAMES

STAGES = ("T_vision_encoder", "T_projector", "T_LLM_prefill", "T_LLM_decode")
TARGETS = STAGES + ("T_total",)
FEATURES: dict[str, tuple[str, ...]] = {
    "T_vision_encoder": ("const", "crops"),
    "T_projector": ("const", "crops"),
    "T_LLM_prefill": ("const", "blocks", "tokens", "tokens_blocks", "tokens_blocks_topk", "tokens2_blocks"),
    "T_LLM_decode": ("const", "steps", "steps_blocks", "steps_blocks_topk", "steps_ctx_blocks"),
}
# the row columns the features are computed from
INPUT_COLUMNS = ("num_crops", "num_total_tokens", "num_output_tokens", "active_blocks_effective",
                 "top_k_effective")
KNOB_COLUMNS = KNOB_NAMES
FORMAT = "flexvlm-ray/estimator/v1"
# a stage's recalibration factor is used when its log ratios differ from 0 at this level (5%, Bonferroni over stages)
FACTOR_TEST_LEVEL = 0.05 / len(STAGES)


def feature_columns(data: Mapping[str, Any] | pd.DataFrame) -> dict[str, np.ndarray]:
    """Every feature as a float array, from a DataFrame or a dict of equal-length arrays."""
    get = (lambda c: np.asarray(data[c], dtype=float))
    crops, tokens, out = get("num_crops"), get("num_total_tokens"), get("num_output_tokens")
    blocks, topk = get("active_blocks_effective"), np.nan_to_num(get("top_k_effective"), nan=1.0)
    steps = np.maximum(out - 1.0, 0.0)
    ctx = tokens + out / 2.0
    return {"const": np.ones_like(crops), "crops": crops, "blocks": blocks, "tokens": tokens,
            "tokens_blocks": tokens * blocks, "tokens_blocks_topk": tokens * blocks * topk,
            "tokens2_blocks": tokens * tokens * blocks, "steps": steps, "steps_blocks": steps * blocks,
            "steps_blocks_topk": steps * blocks * topk, "steps_ctx_blocks": steps * ctx * blocks}


def _design(columns: dict[str, np.ndarray], stage: str) -> np.ndarray:
    return np.column_stack([columns[name] for name in FEATURES[stage]])


def fit_stage(*, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """NNLS of y on X minimizing the relative error; columns are rescaled for conditioning.
    Rows with y <= 0 are weighted as if y were 1% of the median positive time."""
    positive = y[y > 0]
    floor = 0.01 * float(np.median(positive)) if positive.size else 1.0
    w = 1.0 / np.maximum(y, floor)
    Xw = X * w[:, None]
    scale = np.linalg.norm(Xw, axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(Xw / scale, y * w, maxiter=50 * X.shape[1])
    return coef / scale


@dataclass
class StageEstimator:
    """Per-stage coefficients (ms per feature unit) and per-stage recalibration factors."""

    coef: dict[str, dict[str, float]]
    scales: dict[str, float] = field(default_factory=lambda: {s: 1.0 for s in STAGES})
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._vectors = {s: np.array([self.coef[s].get(f, 0.0) for f in FEATURES[s]]) * self.scales.get(s, 1.0)
                         for s in STAGES}

    # -- fit / predict -----------------------------------------------------------------
    @classmethod
    def fit(cls, rows: pd.DataFrame, *, meta: Optional[dict[str, Any]] = None) -> "StageEstimator":
        """Fit every stage on the ok rows given (all of them: split before calling)."""
        rows = usable_rows(rows)
        if rows.empty:
            raise ValueError("no usable rows to fit on (need status ok and the columns "
                             f"{', '.join(INPUT_COLUMNS + STAGES)})")
        columns = feature_columns(rows)
        coef = {}
        for stage in STAGES:
            vector = fit_stage(X=_design(columns, stage), y=rows[stage].to_numpy(float))
            coef[stage] = {name: float(c) for name, c in zip(FEATURES[stage], vector)}
        info = {"fitted_rows": int(len(rows)), "gpu": sorted(set(gpu_label_series(rows)))}
        return cls(coef=coef, meta={**info, **(meta or {})})

    def predict(self, data: Mapping[str, Any] | pd.DataFrame) -> dict[str, np.ndarray]:
        """Predicted ms per stage and ``T_total`` (their sum), one value per input row."""
        columns = feature_columns(data)
        out = {s: _design(columns, s) @ self._vectors[s] for s in STAGES}
        out["T_total"] = sum(out[s] for s in STAGES)
        return out

    # -- transfer ----------------------------------------------------------------------
    def recalibrate(self, rows: pd.DataFrame) -> "StageEstimator":
        """A copy whose stages are scaled to the given rows of another GPU: per stage exp(w * the median log
        ratio of measured / predicted) over rows where both are positive, w from ``choose_shrinkage``
        (recorded in ``meta['shrinkage']``). From three rows on, the factors are kept only if they also
        predict T_total better than the raw transfer in leave-one-configuration-out over the rows (each row
        predicted with the factors of the rows of other configurations; paired t-test at 5%); else the raw transfer (``meta['fallback']``).
        No rows: a copy."""
        rows = usable_rows(rows)
        scales, shrinkage = self._stage_scales(rows)
        fallback = False
        if len(rows) >= 3 and any(w > 0 for w in shrinkage.values()):
            measured = rows["T_total"].to_numpy(float)
            raw = np.abs(self.predict(rows)["T_total"] / measured - 1.0)
            keys = config_keys(rows).to_numpy()
            loo = []
            for i in range(len(rows)):   # leave the row's whole configuration out: held-out configs are unseen
                others, _ = self._stage_scales(rows[keys != keys[i]])
                one = StageEstimator(coef=self.coef, scales=others).predict(rows.iloc[[i]])["T_total"][0]
                loo.append(abs(one / measured[i] - 1.0))
            if not _clearly_better(better=np.asarray(loo), than=raw):
                scales, shrinkage, fallback = dict(self.scales), {k: 0.0 for k in shrinkage}, True
        meta = {**self.meta, "recalibrated_on": sorted(set(gpu_label_series(rows))) if len(rows) else [],
                "recalibration_rows": int(len(rows)), "shrinkage": shrinkage, "fallback": fallback}
        return StageEstimator(coef=self.coef, scales=scales, meta=meta)

    def _stage_scales(self, rows: pd.DataFrame) -> tuple[dict[str, float], dict[str, float]]:
        """Per-stage scales from ``rows`` (median log ratio, shrunk by ``choose_shrinkage``) and the w's."""
        scales, shrinkage = dict(self.scales), {}
        if len(rows):
            predicted = self.predict(rows)
            for stage in STAGES:
                y, p = rows[stage].to_numpy(float), predicted[stage]
                ok = (y > 0) & (p > 0)
                if ok.any():
                    logs = np.log(y[ok] / p[ok])
                    w = choose_shrinkage(logs)
                    shrinkage[stage] = w
                    scales[stage] = self.scales.get(stage, 1.0) * float(np.exp(w * np.median(logs)))
        return scales, shrinkage

    # -- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "features": {s: list(FEATURES[s]) for s in STAGES},
                "coef": self.coef, "scales": self.scales, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageEstimator":
        if data.get("format") != FORMAT:
            raise ValueError(f"not an estimator file (format {data.get('format')!r}, expected {FORMAT!r})")
        return cls(coef={s: dict(data["coef"][s]) for s in STAGES}, scales=dict(data["scales"]),
                   meta=dict(data.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "StageEstimator":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _clearly_better(*, better: np.ndarray, than: np.ndarray) -> bool:
    """Whether the errors ``better`` are lower than ``than`` beyond noise: a one-sided paired t-test at
    FACTOR_TEST_LEVEL * len(STAGES) (5%) on the per-row differences."""
    from scipy.stats import ttest_rel

    diff = np.asarray(than, float) - np.asarray(better, float)
    if diff.size < 2 or not np.any(diff):
        return False
    if np.ptp(diff) == 0:
        return bool(diff[0] > 0)
    return bool(ttest_rel(than, better, alternative="greater").pvalue < FACTOR_TEST_LEVEL * len(STAGES))


def choose_shrinkage(logs: np.ndarray) -> float:
    """1.0 where the log ratios (measured / predicted) of the K rows differ from 0 beyond their noise
    (two-sided one-sample t-test at FACTOR_TEST_LEVEL; identical nonzero ratios count as a factor),
    else 0.0 (keep the raw transfer); 0.0 below two rows."""
    from scipy.stats import t

    logs = np.asarray(logs, float)
    if logs.size < 2:
        return 0.0
    mean, std = float(logs.mean()), float(logs.std(ddof=1))
    if std == 0:
        return 1.0 if mean != 0 else 0.0
    statistic = abs(mean) / (std / np.sqrt(logs.size))
    return 1.0 if statistic > t.ppf(1 - FACTOR_TEST_LEVEL / 2, logs.size - 1) else 0.0


# -- rows, splits, errors ------------------------------------------------------------------
def usable_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """ok rows with every input and stage column present."""
    if rows.empty:
        return rows
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    needed = [c for c in INPUT_COLUMNS + STAGES if c != "top_k_effective"]
    return ok.dropna(subset=needed)


def gpu_label_series(rows: pd.DataFrame) -> pd.Series:
    """The GPU a row ran on: an explicit ``gpu`` label, else gpu_type, else gpu_name."""
    if "gpu" in rows:
        return rows["gpu"].astype(str)
    gpu_type = rows["gpu_type"] if "gpu_type" in rows else pd.Series(None, index=rows.index)
    gpu_name = rows["gpu_name"] if "gpu_name" in rows else pd.Series("unknown", index=rows.index)
    return gpu_type.where(gpu_type.notna(), gpu_name).astype(str)


def config_keys(rows: pd.DataFrame) -> pd.Series:
    """A hashable knob-configuration key per row (dataset not included). A missing knob (a family without it,
    e.g. qwen3_vl_moe's max_crops) is 'None' / 'nan' as ``str`` writes it: ``astype(str)`` keeps pandas' missing
    values missing, which the join refuses."""
    cols = [c for c in KNOB_COLUMNS if c in rows]
    return rows[cols].apply(lambda column: column.map(str)).agg("|".join, axis=1)


def split_configs(rows: pd.DataFrame, *, holdout: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test): whole knob configurations held out, so test configs are unseen."""
    keys = config_keys(rows)
    unique = np.array(sorted(keys.unique()))
    rng = np.random.default_rng(seed)
    n_test = int(round(holdout * len(unique)))
    n_test = min(max(n_test, 1), len(unique) - 1) if len(unique) > 1 else 0
    test_keys = set(rng.choice(unique, size=n_test, replace=False)) if n_test else set()
    is_test = keys.isin(test_keys)
    return rows[~is_test], rows[is_test]


def errors(*, measured: np.ndarray, predicted: np.ndarray, tolerance: float = 0.10) -> dict[str, float]:
    """MAPE (%) and the share of predictions within +-tolerance, over rows measured > 0."""
    measured, predicted = np.asarray(measured, float), np.asarray(predicted, float)
    ok = measured > 0
    if not ok.any():
        return {"mape": float("nan"), "within": float("nan"), "n": 0}
    rel = np.abs(predicted[ok] - measured[ok]) / measured[ok]
    return {"mape": float(100 * rel.mean()), "within": float((rel <= tolerance).mean()), "n": int(ok.sum())}


def evaluate(estimator: StageEstimator, rows: pd.DataFrame, *, tolerance: float = 0.10) -> dict[str, dict]:
    """Errors per stage and for T_total on the given rows."""
    rows = usable_rows(rows)
    predicted = estimator.predict(rows)
    return {t: errors(measured=rows[t].to_numpy(float), predicted=predicted[t], tolerance=tolerance)
            for t in TARGETS}


def sample_rows(rows: pd.DataFrame, *, k: int, seed: int) -> pd.DataFrame:
    """k rows drawn at random without replacement (all of them when k >= len)."""
    if k <= 0:
        return rows.iloc[:0]
    return rows.sample(n=min(k, len(rows)), random_state=seed)


def transfer(*, source: pd.DataFrame, target: pd.DataFrame, k: int, seed: int,
             holdout: float = 0.3, split_seed: Optional[int] = None) -> tuple[StageEstimator, dict[str, dict]]:
    """Fit on the source rows of the target's training configs only (a held-out config is unseen on
    both GPUs), recalibrate on k rows of the target's training configs and report the errors on the
    target's held-out configs. ``split_seed`` (default ``seed``) draws the split, ``seed`` the K rows."""
    train, test = split_configs(usable_rows(target), holdout=holdout, seed=seed if split_seed is None else split_seed)
    source = usable_rows(source)
    base = StageEstimator.fit(source[~config_keys(source).isin(set(config_keys(test)))])
    est = base.recalibrate(sample_rows(train, k=k, seed=seed))
    return est, evaluate(est, test)


def predict_timing(estimator: StageEstimator, rows: pd.DataFrame, *, batch: int = 10_000,
                   repeats: int = 20) -> dict[str, float]:
    """Microseconds per configuration: one-config calls and one vectorized batch call."""
    rows = usable_rows(rows)
    one = {c: rows[c].to_numpy(float)[:1] for c in INPUT_COLUMNS}
    many = {c: np.resize(rows[c].to_numpy(float), batch) for c in INPUT_COLUMNS}
    started = time.perf_counter()
    for _ in range(repeats):
        estimator.predict(one)
    single = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    for _ in range(3):
        estimator.predict(many)
    batched = (time.perf_counter() - started) / 3 / batch
    return {"us_per_call_single": 1e6 * single, "us_per_config_batched": 1e6 * batched}
