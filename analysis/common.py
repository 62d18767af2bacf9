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


def run_model_spec(*, manifest: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    """The model section of the run's frozen spec (RUN_DIR/spec.yaml), or family/preset from the rows."""
    run_dir = manifest.get("run_dir")
    spec_path = Path(run_dir) / "spec.yaml" if run_dir else None
    if spec_path is not None and spec_path.is_file():
        from flexvlm_ray.spec.load import load_spec_text

        spec = load_spec_text(spec_path.read_text(), source=str(spec_path))
        return spec.model.model_dump()
    first = rows.iloc[0]
    return {"family": first["model_family"], "preset": first["model_preset"], "path": None, "options": {}}
