"""The one row schema of a run. Every time is in milliseconds (``T_*``), FLOPs are counts.

One row is one timed pass of one sample in one work unit. Names follow the seed documents
(``T_total``, ``T_vision_encoder``, ``num_vision_tokens`` ...) so their JSON formats can be
exported unchanged. Bump ``SCHEMA_VERSION`` when a column changes meaning: unit ids hash it,
so a resumed run refuses rows of another schema.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2   # 2: timed passes never carry timing hooks, warm-up per shape, patch-based seed vision FLOPs

# Stage names, in execution order; the engine times one named block per stage.
STAGES = ("vision_encoder", "projector", "llm_prefill", "llm_decode")
# Seed field name of each stage's time in ms.
STAGE_FIELDS = {"vision_encoder": "T_vision_encoder", "projector": "T_projector",
                "llm_prefill": "T_LLM_prefill", "llm_decode": "T_LLM_decode"}

_f64, _i64, _str = pa.float64(), pa.int64(), pa.string()

ROW_SCHEMA = pa.schema([
    # identity
    ("unit_id", _str), ("sweep", _str), ("experiment", _str), ("run_id", _str),
    ("model_family", _str), ("model_preset", _str), ("backend", _str), ("dtype", _str),
    ("dataset", _str), ("split", _str), ("shard", _i64), ("num_shards", _i64),
    ("sample_id", _str), ("sample_index", _i64), ("task", _str),
    ("repeat", _i64), ("run_index", _i64),
    # knobs (as requested; null = model default) and the resolved values that ran
    ("max_crops", _i64), ("top_k", _i64), ("active_blocks", _i64), ("block_policy", _str),
    ("max_new_tokens", _i64), ("decode_mode", _str),
    ("top_k_effective", _i64), ("active_blocks_effective", _i64),
    # where it ran
    ("gpu_name", _str), ("gpu_type", _str), ("worker", _str), ("hostname", _str),
    ("status", _str), ("error_type", _str), ("error_message", _str),
    # passes of this sample discarded because the model did one-time setup in them (measure.engine)
    ("setup_passes", _i64),
    # how the pass was measured (measure.engine, measure.noise): the prefill path the timed pass ran
    # ('graphed' | 'eager'), how and on which path T_LLM_prefill_hook was taken, untimed warm-up passes
    # run for this sample's new shape, the sample's timed passes and the CI half-width of T_total they
    # reached, the noise controls on, other processes seen on the GPU
    ("prefill_path", _str), ("prefill_hook_method", _str), ("prefill_hook_path", _str),
    ("warmup_passes", _i64), ("sample_passes", _i64), ("sample_ci_rel", _f64),
    ("noise_controls", _str), ("gpu_other_processes", _i64),
    # seconds of untimed passes the worker ran once before its first timed pass (measure.burn_in_s)
    ("burn_in_s", _f64),
    # token counts
    ("num_crops", _i64), ("num_vision_tokens", _i64), ("num_language_tokens", _i64),
    ("num_total_tokens", _i64), ("num_output_tokens", _i64),
    # stage times, ms
    ("T_total", _f64), ("T_vision_encoder", _f64), ("T_vision_total", _f64), ("T_projector", _f64),
    ("T_LLM_prefill", _f64), ("T_LLM_prefill_hook", _f64), ("T_LLM_decode", _f64),
    ("T_decode_per_token", pa.list_(_f64)),
    ("T_attention_per_block", pa.list_(_f64)), ("T_ffn_per_block", pa.list_(_f64)),
    # FLOPs: the seeds' rough formula (params x tokens x 2) and the analytic count
    ("flops_vision", _f64), ("flops_projector", _f64), ("flops_llm_prefill", _f64),
    ("flops_llm_decode", _f64), ("flops_total", _f64),
    ("flops_vision_analytic", _f64), ("flops_projector_analytic", _f64),
    ("flops_llm_prefill_analytic", _f64), ("flops_llm_decode_analytic", _f64),
    ("flops_total_analytic", _f64),
    # quality
    ("prediction", _str), ("metric", _str), ("score", _f64),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    # closed-loop runs (spec.control, E4; null elsewhere): the unit's role (train | reference | control),
    # the policy label, whether the guardrail filtered, the budget (fraction of the full model's P50
    # T_total on the workload in this run, and ms), the time of the decision and of building its Request from the
# dataset sample in microseconds, T_total > budget
    ("role", _str), ("policy", _str), ("guardrail", pa.bool_()), ("budget_fraction", _f64), ("budget_ms", _f64),
    ("reference_p50_ms", _f64), ("decision_us", _f64), ("request_us", _f64), ("violated", pa.bool_()),
])

COLUMNS = tuple(ROW_SCHEMA.names)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Arrow table of rows in the run schema; unknown keys are an error, missing ones null."""
    unknown = {key for row in rows for key in row} - set(COLUMNS)
    if unknown:
        raise KeyError(f"row fields not in the run schema: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
