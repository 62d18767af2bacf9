"""Read a run back: exactly the manifest's units, verified, as one Arrow table or a DataFrame.

A finished run is read from its compacted rows.parquet (one file); otherwise every part is read
and checked against its checksum. Corrupt parts and stray files are left out with a warning.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from flexvlm_ray.store.writer import RunStore


def load_table(run_dir: str | Path) -> pa.Table:
    return RunStore(run_dir).read_rows().table


def load_frame(run_dir: str | Path):
    """The run's rows as a pandas DataFrame (one row per sample pass)."""
    return load_table(run_dir).to_pandas()
