"""The short per-configuration summary that ``launch`` and ``status`` print."""
from __future__ import annotations

import pandas as pd

from flexvlm_ray.knobs.base import KNOB_NAMES

KNOB_COLUMNS = ["dataset", *KNOB_NAMES]
STAGE_COLUMNS = ["T_vision_encoder", "T_projector", "T_LLM_prefill", "T_LLM_decode", "T_total"]


def summary_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per knob configuration: sample passes, median stage times (ms), P95 total,
    median vision tokens and output tokens, mean score (where scored)."""
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    keys = [c for c in KNOB_COLUMNS if c in ok and ok[c].notna().any()]
    grouped = ok.groupby(keys, dropna=False)
    out = grouped[STAGE_COLUMNS].median().rename(columns=lambda c: f"{c}_p50")
    out.insert(0, "n", grouped.size())
    out["T_total_p95"] = grouped["T_total"].quantile(0.95)
    out["vision_tokens"] = grouped["num_vision_tokens"].median()
    out["output_tokens"] = grouped["num_output_tokens"].median()
    if ok["score"].notna().any():
        out["score"] = grouped["score"].mean()
    return out.reset_index()


def format_summary(rows: pd.DataFrame, *, max_rows: int = 40) -> str:
    table = summary_table(rows)
    if table.empty:
        return "no successful rows"
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_rows", max_rows,
                           "display.float_format", lambda v: f"{v:.3g}"):
        return table.to_string(index=False, max_rows=max_rows)
