"""Results are shared by a team: every file the store writes gets the user's umask (a temp file
from mkstemp alone would stay 0600)."""
from __future__ import annotations

import os
import stat

import pyarrow as pa
import pytest

from flexvlm_ray.store.writer import RunStore, atomic_write_json, file_mode


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(umask, mode, tmp_path):
    old = os.umask(umask)
    file_mode.cache_clear()
    try:
        store = RunStore(tmp_path / "run")
        store.parts.mkdir(parents=True)
        store.failures.mkdir(parents=True)
        store.write_part("u1", pa.table({"x": [1]}))
        store.write_failure("u2", {"error_type": "Timeout"})
        atomic_write_json(tmp_path / "run" / "manifest.json", {"a": 1})
    finally:
        os.umask(old)
        file_mode.cache_clear()
    for path in (store.parts / "u1.parquet", store.failures / "u2.json", tmp_path / "run" / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
