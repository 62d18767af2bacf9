"""A run's home on disk. Every file is written atomically (temp file, fsync, rename).

    RUN_DIR/spec.yaml              frozen copy of the spec as given (overrides applied)
    RUN_DIR/manifest.json          schema version, spec hash, unit ids in run order, status
    RUN_DIR/units.jsonl            every work unit, one JSON object a line
    RUN_DIR/env.json               driver host, versions, git sha, and each worker's GPU
    RUN_DIR/parts/<unit_id>.parquet   the unit's rows (exists <=> the unit is done)
    RUN_DIR/failures/<unit_id>.json   type, message, traceback of the unit's last failure
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from flexvlm_ray.store.schema import SCHEMA_VERSION


@functools.lru_cache(maxsize=1)
def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under this process's umask (read once:
    reading the umask means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename; the file gets the user's
    umask (mkstemp alone would make it 0600, unreadable to the rest of a team)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())



class StoredUnit(Protocol):
    """What the store needs of a work unit (spec.expand.WorkUnit is one); the store imports no spec."""

    unit_id: str
    sweep: str
    experiment: str

    def to_dict(self) -> dict[str, Any]: ...


class RunStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)
        self.parts = self.root / "parts"
        self.failures = self.root / "failures"

    # -- creation ----------------------------------------------------------------------
    def create(self, *, spec_text: str, spec_hash: str, units: list["StoredUnit"], run_id: str) -> None:
        if (self.root / "manifest.json").exists():
            raise FileExistsError(f"{self.root} already holds a run; resume it with "
                                  f"`flexvlm-ray launch --resume {self.root}` or pick another --run-id")
        self.parts.mkdir(parents=True, exist_ok=True)
        self.failures.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "spec.yaml", spec_text.encode())
        atomic_write_bytes(self.root / "units.jsonl",
                           "".join(json.dumps(u.to_dict(), sort_keys=True) + "\n" for u in units).encode())
        atomic_write_json(self.root / "manifest.json", {
            "run_id": run_id, "schema_version": SCHEMA_VERSION, "spec_hash": spec_hash,
            "sweep": units[0].sweep if units else None,
            "experiment": units[0].experiment if units else None,
            "unit_ids": [u.unit_id for u in units], "status": "created",
        })

    def remove_partial_writes(self) -> int:
        """Delete temp files left by a writer that was killed mid-write; returns how many."""
        stale = list(self.root.glob("**/.*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def manifest(self) -> dict[str, Any]:
        path = self.root / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.root} is not a run folder (no manifest.json)")
        return json.loads(path.read_text())

    def update_manifest(self, **fields: Any) -> None:
        atomic_write_json(self.root / "manifest.json", {**self.manifest(), **fields})

    def spec_text(self) -> str:
        return (self.root / "spec.yaml").read_text()

    def write_env(self, env: dict[str, Any]) -> None:
        atomic_write_json(self.root / "env.json", env)

    # -- results ---------------------------------------------------------------------------
    def write_part(self, unit_id: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        atomic_write_bytes(self.parts / f"{unit_id}.parquet", sink.getvalue().to_pybytes())
        (self.failures / f"{unit_id}.json").unlink(missing_ok=True)

    def write_failure(self, unit_id: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.failures / f"{unit_id}.json", record)

    def done_ids(self) -> set[str]:
        return {p.stem for p in self.parts.glob("*.parquet")} if self.parts.exists() else set()

    def failure_records(self) -> dict[str, dict[str, Any]]:
        if not self.failures.exists():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.failures.glob("*.json"))}

    def part_paths(self, unit_ids: Iterable[str] | None = None) -> list[Path]:
        if unit_ids is None:
            return sorted(self.parts.glob("*.parquet"))
        return [self.parts / f"{u}.parquet" for u in unit_ids if (self.parts / f"{u}.parquet").exists()]
