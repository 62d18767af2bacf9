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


METRIC_LABELS = {"vqa_accuracy": "VQA acc", "cider_d": "CIDEr-D", "anls": "ANLS", "mc_accuracy": "MC acc",
                 "count_accuracy": "count acc"}
KNOB_HEADERS = {"dataset": "dataset", "max_crops": "crops", "top_k": "top_k", "active_blocks": "blocks",
                "block_policy": "policy", "max_new_tokens": "new_tok"}
# terminal columns: (summary_table column, header); the last ones are dropped first when too wide
TIME_COLUMNS = [("T_vision_encoder_p50", "vision ms"), ("T_LLM_prefill_p50", "prefill ms"),
                ("T_LLM_decode_p50", "decode ms"), ("T_total_p50", "total ms")]
OPTIONAL_COLUMNS = [("T_total_p95", "p95 ms"), ("vision_tokens", "vis_tok"), ("output_tokens", "out_tok"),
                    ("T_projector_p50", "proj ms")]
MAX_WIDTH = 120


def _ms(value: float) -> str:
    """Milliseconds in fixed notation: 3 significant digits down to 0.01 ms."""
    if pd.isna(value):
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _count(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.0f}"


def format_summary(rows: pd.DataFrame, *, max_rows: int = 40, width: int = MAX_WIDTH) -> str:
    """The per-configuration table for a terminal: knobs that vary (constant ones on one line
    above), median stage times in ms (fixed notation), the score with its metric's name beside it
    (VQA accuracy and CIDEr-D are different scales), at most ``width`` columns."""
    table = summary_table(rows)
    if table.empty:
        return "no successful rows"
    knobs = [c for c in KNOB_COLUMNS if c in table]
    varying = [c for c in knobs if table[c].astype(str).nunique() > 1 or c == "dataset"]
    fixed = [f"{KNOB_HEADERS[c]}={_value(table[c].iloc[0])}" for c in knobs if c not in varying]
    out = pd.DataFrame({KNOB_HEADERS[c]: table[c].map(_value) for c in varying})
    out["n"] = table["n"].map(_count)
    for column, header in TIME_COLUMNS:
        out[header] = table[column].map(_ms)
    if "score" in table:
        metrics = _metric_names(rows, varying)
        labels = [metrics.get(tuple(_value(v) for v in r), "") for r in table[varying].itertuples(index=False)]
        out["score"] = [("-" if pd.isna(v) else f"{v:.3f} {label}".rstrip())
                        for v, label in zip(table["score"], labels)]
    extras = [(c, h) for c, h in OPTIONAL_COLUMNS if c in table]
    shown = out
    for keep in range(len(extras), -1, -1):
        shown = out.copy()
        for i, (column, header) in enumerate(extras[:keep]):
            shown.insert(len(varying) + 1 + len(TIME_COLUMNS) + i, header,
                         table[column].map(_ms if column.startswith("T_") else _count))
        text = shown.to_string(index=False, max_rows=max_rows)
        if max(len(line) for line in text.splitlines()) <= width:
            break
    lines = ([f"fixed: {', '.join(fixed)}"] if fixed else []) + [text]
    if len(table) > max_rows:
        lines.append(f"({len(table)} configurations; the analysis JSON has all of them)")
    return "\n".join(lines)


def _value(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "dflt"
    return str(int(value)) if isinstance(value, float) and float(value).is_integer() else str(value)


def _metric_names(rows: pd.DataFrame, keys: list[str]) -> dict[tuple, str]:
    """configuration (as shown) -> its metric's label, from the rows' metric column."""
    if "metric" not in rows or not keys:
        return {}
    ok = rows[(rows["status"] == "ok") & rows["metric"].notna()]
    names = {}
    for _, row in ok.drop_duplicates(subset=keys + ["metric"]).iterrows():
        names[tuple(_value(row[k]) for k in keys)] = METRIC_LABELS.get(row["metric"], row["metric"])
    return names
