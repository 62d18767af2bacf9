"""Helpers shared by the experiment analyses: successful rows, seed-format entries, statistics,
linear fits, JSON output, and the component parameter counts of a run's model."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from flexvlm_ray.knobs.base import KNOB_NAMES, SHORT_NAMES
from flexvlm_ray.spec.schema import ModelSpec

# The seeds' per-sample entry (001_*.txt "Data Format"), in their order.
SEED_ENTRY_FIELDS = ("num_crops", "num_vision_tokens", "num_language_tokens", "num_total_tokens",
                     "num_output_tokens", "T_total", "T_vision_encoder", "T_vision_total", "T_projector",
                     "T_LLM_prefill", "T_LLM_decode", "flops_vision", "flops_projector",
                     "flops_llm_prefill", "flops_llm_decode", "flops_total")
# Extra columns every exported entry carries after the seed fields.
EXTRA_ENTRY_FIELDS = ("sample_id", "dataset", "run_index", "repeat", *KNOB_NAMES, "T_LLM_prefill_hook", "flops_vision_analytic",
                      "flops_projector_analytic", "flops_llm_prefill_analytic", "flops_llm_decode_analytic",
                      "flops_total_analytic", "gpu_name")
STAGE_TIMES = ("T_vision_encoder", "T_projector", "T_LLM_prefill", "T_LLM_decode")
TIME_FIELDS = ("T_total", "T_vision_encoder", "T_vision_total", "T_projector", "T_LLM_prefill",
               "T_LLM_prefill_hook", "T_LLM_decode")
KNOBS = KNOB_NAMES


def ok_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of successful passes (status 'ok'), index reset."""
    return rows[rows["status"] == "ok"].reset_index(drop=True)


def plain(value: Any) -> Any:
    """A JSON-safe scalar: numpy numbers become Python ones, NaN and None become None."""
    if value is None:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if value is pd.NaT:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def entries(rows: pd.DataFrame, *, extra: Iterable[str] = EXTRA_ENTRY_FIELDS) -> list[dict[str, Any]]:
    """One seed-format dict per row: the seed fields first, then ``extra`` columns present."""
    fields = [f for f in (*SEED_ENTRY_FIELDS, *extra) if f in rows.columns]
    return [{f: plain(row[f]) for f in fields} for _, row in rows.iterrows()]


def stats(values: Iterable[float]) -> dict[str, Optional[float]]:
    """n, mean, std (sample, ddof=1), min, max and P50/P95/P99 (numpy's linear quantiles)."""
    x = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype=float)
    if x.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "p50": None, "p95": None, "p99": None}
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "p50": float(np.quantile(x, 0.50)),
            "p95": float(np.quantile(x, 0.95)), "p99": float(np.quantile(x, 0.99))}


def linear_fit(x: Iterable[float], y: Iterable[float]) -> dict[str, Optional[float]]:
    """Least-squares line y = slope * x + intercept (np.polyfit, degree 1), Pearson r and R^2
    (1 - SS_res / SS_tot); None where fewer than two distinct x values make it undefined."""
    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    if x.size < 2 or np.unique(x).size < 2:
        return {"slope": None, "intercept": None, "pearson_r": None, "r2": None, "n": int(x.size)}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / ss_tot if ss_tot > 0 else None
    r = float(np.corrcoef(x, y)[0, 1]) if ss_tot > 0 and x.std() > 0 else None
    return {"slope": float(slope), "intercept": float(intercept), "pearson_r": r, "r2": r2, "n": int(x.size)}


def flops_column(rows: pd.DataFrame, *, stage: str) -> str:
    """The analytic FLOPs column of ``stage`` where the rows hold it, else the seeds' formula."""
    analytic = f"flops_{stage}_analytic"
    if analytic in rows and rows[analytic].notna().any():
        return analytic
    return f"flops_{stage}"


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(obj), indent=2) + "\n")
    return path


def figures_dir(out_dir: Path) -> Path:
    path = Path(out_dir) / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def varying_knobs(rows: pd.DataFrame) -> list[str]:
    """Knob columns that take more than one value in ``rows`` (block_policy only with blocks)."""
    return [k for k in KNOBS if k in rows and rows[k].nunique(dropna=False) > 1]


def config_label(values: dict[str, Any]) -> str:
    short = SHORT_NAMES
    parts = [f"{short[k]}={int(v)}" if short[k] else str(v) for k, v in values.items()
             if v is not None and not pd.isna(v)]
    return " ".join(parts) or "default"


def component_params(*, family: str, preset: Optional[str], path: Optional[str] = None,
                     options: Optional[dict[str, Any]] = None) -> dict[str, int]:
    """Parameters of vision_encoder, projector and llm (whole decoder) of a model, by the family's
    public ``count_params`` (flexmoe counts a 'meta' device build: no weights, no memory)."""
    from flexvlm_ray.models import MODELS

    counts = MODELS.get(family).count_params(preset=preset, path=path, options=dict(options or {}))
    return {k: int(counts[k]) for k in ("vision_encoder", "projector", "llm") if k in counts}


def run_model_spec(*, manifest: dict[str, Any], rows: pd.DataFrame) -> ModelSpec:
    """The model section of the run's frozen spec (RUN_DIR/spec.yaml); without one, family and preset (and
    dtype and backend where the rows have them) from the rows, the spec's defaults for the rest."""
    run_dir = manifest.get("run_dir")
    spec_path = Path(run_dir) / "spec.yaml" if run_dir else None
    if spec_path is not None and spec_path.is_file():
        from flexvlm_ray.spec.load import load_spec_text

        return load_spec_text(spec_path.read_text(), source=str(spec_path)).model
    first = rows.iloc[0]
    known = {k: first[k] for k in ("dtype", "backend") if k in rows and isinstance(first[k], str)}
    return ModelSpec(family=first["model_family"], preset=first["model_preset"], **known)


# -- statistics every analysis shares: bootstrap CIs, constant quality, figure labels ---------
BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95
METRIC_LABELS = {"vqa_accuracy": "VQA accuracy", "cider_d": "CIDEr-D", "anls": "ANLS",
                 "mc_accuracy": "multiple-choice accuracy", "count_accuracy": "count accuracy"}


def _finite(values: Iterable[float]) -> np.ndarray:
    x = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype=float)
    return x[np.isfinite(x)]


def bootstrap_ci(values: Iterable[float], *, statistic: str = "median", seed: int = 0,
                 confidence: float = CONFIDENCE) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap CI (scipy.stats.bootstrap, ``BOOTSTRAP_RESAMPLES`` resamples) of the median
    or mean; (v, v) for one value or constant values, (None, None) for none."""
    from scipy.stats import bootstrap

    x = _finite(values)
    if x.size == 0:
        return None, None
    if x.size == 1 or np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    func = {"median": np.median, "mean": np.mean}[statistic]
    res = bootstrap((x,), func, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=confidence,
                    method="percentile", random_state=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def exceeds_ci(low: Optional[float], high: Optional[float]) -> bool:
    """Whether a CI of a difference excludes 0 (a claim may be made on it)."""
    return low is not None and high is not None and (low > 0 or high < 0)


def quality_is_constant(scores: Iterable[float]) -> bool:
    """True where no score was measured or every measured score is the same (e.g. random weights)."""
    x = _finite(scores)
    return x.size == 0 or bool(np.ptp(x) == 0)


def metric_label(rows: pd.DataFrame) -> str:
    """The y-axis name of the rows' quality metric (one metric per workload), e.g. 'VQA accuracy'."""
    names = sorted(set(rows["metric"].dropna())) if "metric" in rows else []
    if len(names) == 1:
        return METRIC_LABELS.get(names[0], names[0])
    return " / ".join(METRIC_LABELS.get(n, n) for n in names) or "quality"


def figure_title(rows: pd.DataFrame, what: str) -> str:
    """'<what> | <GPU> | <model> | <date of the first row>' for a figure a reader can place."""
    gpus = sorted(set(rows["gpu_name"].dropna().astype(str))) if "gpu_name" in rows else []
    model = ""
    if "model_family" in rows and len(rows):
        first = rows.iloc[0]
        model = f"{first['model_family']}:{first.get('model_preset')}"
        if "backend" in rows and pd.notna(first.get("backend")):
            model += f" ({first['backend']})"
    date = ""
    if "timestamp" in rows and rows["timestamp"].notna().any():
        date = pd.to_datetime(rows["timestamp"]).min().strftime("%Y-%m-%d")
    return " | ".join(p for p in (what, ", ".join(gpus), model, date) if p)


def short_label(values: dict[str, Any], *, varying: Iterable[str]) -> str:
    """``config_label`` of only the knobs that vary in the run (constant knobs only clutter labels)."""
    keep = set(varying)
    return config_label({k: v for k, v in values.items() if k in keep})


def difference_ci(low: Iterable[float], high: Iterable[float], *, seed: int = 0,
                  confidence: float = CONFIDENCE) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap CI of mean(high) - mean(low), the two groups resampled independently;
    (None, None) where either group has fewer than two values."""
    from scipy.stats import bootstrap

    a, b = _finite(low), _finite(high)
    if a.size < 2 or b.size < 2:
        return None, None
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        d = float(b[0] - a[0])
        return d, d
    res = bootstrap((a, b), lambda x, y, axis=-1: np.mean(y, axis=axis) - np.mean(x, axis=axis),
                    n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=confidence, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True, paired=False)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(values: Iterable[float]) -> list[Optional[float]]:
    """[low, high] of the bootstrap 95% CI of the mean (a JSON-ready list)."""
    return list(bootstrap_ci(values, statistic="mean"))


def effect(low: Iterable[float], high: Iterable[float]) -> dict[str, Any]:
    """mean(high) - mean(low) with its bootstrap 95% CI and ``exceeds_ci``: whether the CI excludes 0,
    the condition for claiming the effect (a knob's cost, a difference between settings)."""
    a, b = _finite(low), _finite(high)
    diff = float(b.mean() - a.mean()) if a.size and b.size else None
    lo, hi = difference_ci(a, b)
    return {"diff": diff, "ci95": [lo, hi], "exceeds_ci": exceeds_ci(lo, hi)}


def ratio_ci(low: Iterable[float], high: Iterable[float], *, seed: int = 0,
             confidence: float = CONFIDENCE) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap CI of mean(high) / mean(low), the groups resampled independently; (None, None)
    where either group has fewer than two values or mean(low) can be 0."""
    a, b = _finite(low), _finite(high)
    if a.size < 2 or b.size < 2 or a.min() <= 0:
        return None, None
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, (BOOTSTRAP_RESAMPLES, a.size))].mean(axis=1)
    rb = b[rng.integers(0, b.size, (BOOTSTRAP_RESAMPLES, b.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(rb / ra, [tail, 1 - tail])
    return float(lo), float(hi)


def slope_ci(x: Iterable[float], y: Iterable[float], *, seed: int = 0,
             confidence: float = CONFIDENCE) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap CI of the least-squares slope of y on x, (x, y) pairs resampled together;
    (None, None) with fewer than three pairs or fewer than two distinct x values."""
    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or np.unique(x).size < 2:
        return None, None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, x.size, (BOOTSTRAP_RESAMPLES, x.size))
    xs, ys = x[picks], y[picks]
    xc = xs - xs.mean(axis=1, keepdims=True)
    var = (xc ** 2).sum(axis=1)
    ok = var > 0
    slopes = (xc * (ys - ys.mean(axis=1, keepdims=True))).sum(axis=1)[ok] / var[ok]
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(slopes, [tail, 1 - tail])
    return float(lo), float(hi)


def error_bars(center: Iterable[Optional[float]], cis: Iterable[Any]) -> np.ndarray:
    """(2, n) distances below and above ``center`` for matplotlib's ``yerr`` / ``xerr`` from [low, high]
    CIs; 0 where a CI is missing."""
    center = np.asarray([np.nan if c is None else c for c in center], dtype=float)
    ci = np.asarray([(np.nan, np.nan) if c is None or c[0] is None else c for c in cis], dtype=float).reshape(-1, 2)
    return np.nan_to_num(np.vstack([center - ci[:, 0], ci[:, 1] - center]).clip(min=0))
