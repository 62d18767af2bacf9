"""Read a run back: one Arrow table (pyarrow.dataset over the parts) or a DataFrame."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

from flexvlm_ray.store.schema import ROW_SCHEMA
from flexvlm_ray.store.writer import RunStore


def load_table(run_dir: str | Path) -> pa.Table:
    store = RunStore(run_dir)
    store.manifest()  # a clear error when this is not a run folder
    paths = store.part_paths()
    if not paths:
        return ROW_SCHEMA.empty_table()
    return pads.dataset([str(p) for p in paths], schema=ROW_SCHEMA, format="parquet").to_table()


def load_frame(run_dir: str | Path):
    """The run's rows as a pandas DataFrame (one row per sample pass)."""
    return load_table(run_dir).to_pandas()
