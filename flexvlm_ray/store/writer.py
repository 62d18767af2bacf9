"""A run's home on disk. Every file is written atomically (temp file, fsync, rename).

    RUN_DIR/spec.yaml              frozen copy of the spec as given (overrides applied)
    RUN_DIR/manifest.json          schema version, spec hash, unit ids in run order, status
    RUN_DIR/units.jsonl            every work unit, one JSON object a line
    RUN_DIR/env.json               driver host, versions, git sha, and each worker's GPU
    RUN_DIR/parts/<unit_id>.parquet   the unit's rows (exists and verifies <=> the unit is done)
    RUN_DIR/parts/<unit_id>.sha256    SHA-256 of the part's bytes, written before the part
    RUN_DIR/failures/<unit_id>.json   type, message, traceback of the unit's last failure
    RUN_DIR/rows.parquet           every done unit's rows in one file, written when a session ends
                                   (its SHA-256 and the set of units it holds are in the manifest)
    RUN_DIR/corrupt/               parts that failed verification, moved aside by the lock holder
    RUN_DIR/.lock                  the live driver's lock (store.lock)

Readers take exactly the manifest's units: a part is read only when its unit is in the manifest
and its bytes match its checksum; anything else in parts/ is ignored with a warning. A damaged
metadata file (manifest.json, units.jsonl) is a ``StoreError`` naming the file and what to do.
"""
from __future__ import annotations

import datetime as dt
import errno
import functools
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from flexvlm_ray.store.schema import ROW_SCHEMA, SCHEMA_VERSION


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


ROWS_FILE = "rows.parquet"


class StoreError(ValueError):
    """A run folder's metadata file is missing or damaged; the message names it and what to do."""


class CorruptPart(ValueError):
    """A part whose bytes do not match its checksum, or that is not a readable Parquet file."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ids_digest(unit_ids: Iterable[str]) -> str:
    return sha256_bytes("\n".join(sorted(unit_ids)).encode())


def parse_part(data: bytes, *, columns: Optional[list[str]] = None) -> pa.Table:
    """A part's rows in the run schema (page checksums verified where the file has them)."""
    schema = ROW_SCHEMA if columns is None else pa.schema([ROW_SCHEMA.field(c) for c in columns])
    source = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    have = [c for c in schema.names if c in source.schema_arrow.names]
    table = source.read(columns=have)
    arrays = [table.column(f.name) if f.name in have else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=pa.schema(
        [f.with_type(a.type) for f, a in zip(schema, arrays)])).cast(schema)


@dataclass
class RunRows:
    """What a reader got: the rows, the units they come from, and what it had to leave out."""

    table: pa.Table
    done: list[str]                      # manifest units with a verified part, in run order
    corrupt: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    compacted: bool = False              # read from rows.parquet


class RunStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)
        self.parts = self.root / "parts"
        self.failures = self.root / "failures"
        self.corrupt = self.root / "corrupt"

    # -- creation ----------------------------------------------------------------------
    def create(self, *, spec_text: str, spec_hash: str, units: list["StoredUnit"], run_id: str) -> None:
        if (self.root / "manifest.json").exists():
            raise FileExistsError(f"{self.root} already holds a run; resume it with "
                                  f"`flexvlm-ray launch --resume {self.root}` or pick another --run-id")
        self.parts.mkdir(parents=True, exist_ok=True)
        self.failures.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "spec.yaml", spec_text.encode())
        self.write_units(units)
        atomic_write_json(self.root / "manifest.json", {
            "run_id": run_id, "schema_version": SCHEMA_VERSION, "spec_hash": spec_hash,
            "sweep": units[0].sweep if units else None,
            "experiment": units[0].experiment if units else None,
            "unit_ids": [u.unit_id for u in units], "status": "created",
        })

    def write_units(self, units: list["StoredUnit"]) -> None:
        atomic_write_bytes(self.root / "units.jsonl",
                           "".join(json.dumps(u.to_dict(), sort_keys=True) + "\n" for u in units).encode())

    def remove_partial_writes(self) -> int:
        """Delete temp files left by a writer that was killed mid-write; returns how many.
        Only the holder of the run's lock may call this (a live writer's temp files are in flight)."""
        stale = list(self.root.glob("**/.*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def manifest(self) -> dict[str, Any]:
        path = self.root / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.root} is not a run folder (no manifest.json)")
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path} is damaged ({_short(exc)}); restore it from a backup, or start a new "
                             f"run (the rows in {self.parts} are intact)") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("unit_ids"), list) \
                or "run_id" not in manifest:
            raise StoreError(f"{path} is damaged (no run_id / unit_ids list); restore it from a backup, "
                             f"or start a new run")
        return manifest

    def update_manifest(self, **fields: Any) -> None:
        atomic_write_json(self.root / "manifest.json", {**self.manifest(), **fields})

    def units(self) -> list[dict[str, Any]]:
        """The run's work units as written in units.jsonl (plain dicts; spec.expand.WorkUnit.from_dict
        makes units of them); StoreError when the file is damaged or disagrees with the manifest."""
        path = self.root / "units.jsonl"
        try:
            lines = path.read_text().splitlines()
            units = [json.loads(line) for line in lines if line]
            ids = [u["unit_id"] for u in units]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"{path} is damaged ({_short(exc)}); `flexvlm-ray launch --resume {self.root}` "
                             f"rewrites it from spec.yaml") from None
        if ids != self.manifest()["unit_ids"]:
            raise StoreError(f"{path} is damaged ({len(units)} units, the manifest lists "
                             f"{len(self.manifest()['unit_ids'])}); `flexvlm-ray launch --resume {self.root}` "
                             f"rewrites it from spec.yaml")
        return units

    def spec_text(self) -> str:
        return (self.root / "spec.yaml").read_text()

    def write_env(self, env: dict[str, Any]) -> None:
        atomic_write_json(self.root / "env.json", env)

    # -- results ---------------------------------------------------------------------------
    def write_part(self, unit_id: str, table: pa.Table) -> None:
        """The checksum goes first, then the part: a part on disk always has its checksum."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
        data = sink.getvalue().to_pybytes()
        atomic_write_bytes(self.parts / f"{unit_id}.sha256", (sha256_bytes(data) + "\n").encode())
        atomic_write_bytes(self.parts / f"{unit_id}.parquet", data)
        (self.failures / f"{unit_id}.json").unlink(missing_ok=True)

    def write_failure(self, unit_id: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.failures / f"{unit_id}.json", record)

    def part_files(self) -> set[str]:
        """Stems of every ``*.parquet`` in parts/ (unverified; strays included)."""
        if not self.parts.exists():
            return set()
        return {name[:-len(".parquet")] for name in os.listdir(self.parts)
                if name.endswith(".parquet") and not name.startswith(".")}

    def done_ids(self) -> set[str]:
        """Units of the manifest with a part file (unverified; ``verify_parts`` checks them)."""
        return self.part_files() & set(self.manifest()["unit_ids"])

    def read_part(self, unit_id: str, *, columns: Optional[list[str]] = None) -> pa.Table:
        """The unit's rows, after checking the part's bytes against its checksum."""
        path = self.parts / f"{unit_id}.parquet"
        data = path.read_bytes()
        check = self.parts / f"{unit_id}.sha256"
        if check.exists() and sha256_bytes(data) != check.read_text().strip():
            raise CorruptPart(f"{path}: content does not match its checksum")
        try:
            return parse_part(data, columns=columns)
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            raise CorruptPart(f"{path}: not a readable part ({_short(exc)})") from None

    def verify_parts(self, *, move_aside: bool = False) -> tuple[set[str], list[str]]:
        """(verified done units, corrupt units). With ``move_aside`` (lock holder only) the corrupt
        parts go to RUN_DIR/corrupt/ so their units run again."""
        done, corrupt = set(), []
        for unit_id in sorted(self.done_ids()):
            try:
                if (self.parts / f"{unit_id}.sha256").exists():
                    self._check_sum(unit_id)
                else:
                    self.read_part(unit_id, columns=["unit_id"])
            except CorruptPart as exc:
                corrupt.append(unit_id)
                self.warn_corrupt(exc, moved=move_aside)
                if move_aside:
                    self._move_aside(unit_id)
            else:
                done.add(unit_id)
        return done, corrupt

    def warn_corrupt(self, exc: CorruptPart, *, moved: bool) -> None:
        tail = f"moved to {self.corrupt}/; its unit runs again" if moved else \
            f"left out; `flexvlm-ray launch --resume {self.root}` moves it aside and runs its unit again"
        warn(f"{exc}; {tail}")

    def _move_aside(self, unit_id: str) -> None:
        self.corrupt.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for suffix in (".parquet", ".sha256"):
            src = self.parts / f"{unit_id}{suffix}"
            if src.exists():
                os.replace(src, self.corrupt / f"{unit_id}.{stamp}{suffix}")

    def failure_records(self) -> dict[str, dict[str, Any]]:
        """Failure records of the manifest's units; a damaged record is skipped with a warning (its
        unit counts as pending), a record of a unit not in the manifest is ignored."""
        if not self.failures.exists():
            return {}
        known = set(self.manifest()["unit_ids"])
        records = {}
        for path in sorted(self.failures.glob("*.json")):
            if path.stem not in known:
                continue
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                warn(f"{path} is damaged ({_short(exc)}); its unit counts as pending and runs again on "
                     f"`flexvlm-ray launch --resume {self.root}`")
                continue
            records[path.stem] = record
        return records

    def part_paths(self, unit_ids: Iterable[str] | None = None) -> list[Path]:
        if unit_ids is None:
            unit_ids = self.manifest()["unit_ids"]
        return [self.parts / f"{u}.parquet" for u in unit_ids if (self.parts / f"{u}.parquet").exists()]

    # -- reading a run ---------------------------------------------------------------------
    def read_rows(self, *, columns: Optional[list[str]] = None) -> RunRows:
        """Rows of exactly the manifest's units. When rows.parquet holds the same units as parts/
        and matches its checksum it is read in one go; else every part is read and verified."""
        unit_ids = self.manifest()["unit_ids"]
        files = self.part_files()
        known = set(unit_ids)
        stray = sorted(files - known)
        if stray:
            warn(f"{self.parts}: ignoring {len(stray)} file(s) that are not units of this run: "
                 f"{', '.join(s + '.parquet' for s in stray[:5])}{' ...' if len(stray) > 5 else ''}")
        present = [u for u in unit_ids if u in files]
        compacted = self._read_compacted(present=present, columns=columns)
        if compacted is not None:
            return RunRows(table=compacted, done=present, stray=stray, compacted=True)
        schema = ROW_SCHEMA if columns is None else pa.schema([ROW_SCHEMA.field(c) for c in columns])
        done, corrupt = [], []
        for unit_id in present:  # checksums first (cheap), then one scan over the parts that pass
            try:
                self._check_sum(unit_id)
                done.append(unit_id)
            except FileNotFoundError:
                continue
            except CorruptPart as exc:
                corrupt.append(unit_id)
                self.warn_corrupt(exc, moved=False)
        if not done:
            return RunRows(table=schema.empty_table(), done=done, corrupt=corrupt, stray=stray)
        try:
            table = self._scan(done, columns=columns)
        except (pa.ArrowException, OSError, ValueError, KeyError):
            # a part that passes its checksum but does not parse (e.g. written before checksums):
            # read them one by one to tell which
            tables, good = [], []
            for unit_id in done:
                try:
                    tables.append(self.read_part(unit_id, columns=columns))
                    good.append(unit_id)
                except CorruptPart as exc:
                    corrupt.append(unit_id)
                    self.warn_corrupt(exc, moved=False)
            done = good
            table = pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()
        return RunRows(table=table, done=done, corrupt=corrupt, stray=stray)

    def _check_sum(self, unit_id: str) -> None:
        check = self.parts / f"{unit_id}.sha256"
        if check.exists():
            path = self.parts / f"{unit_id}.parquet"
            if sha256_bytes(path.read_bytes()) != check.read_text().strip():
                raise CorruptPart(f"{path}: content does not match its checksum")

    def _scan(self, unit_ids: list[str], *, columns: Optional[list[str]]) -> pa.Table:
        import pyarrow.dataset as pads

        fmt = pads.ParquetFileFormat(default_fragment_scan_options=pads.ParquetFragmentScanOptions(
            page_checksum_verification=True))
        paths = [str(self.parts / f"{u}.parquet") for u in unit_ids]
        return pads.dataset(paths, schema=ROW_SCHEMA, format=fmt).to_table(columns=columns).combine_chunks()

    def _read_compacted(self, *, present: list[str], columns: Optional[list[str]]) -> Optional[pa.Table]:
        info = self.manifest().get("rows_file")
        path = self.root / ROWS_FILE
        if not info or not path.exists() or info.get("unit_ids_sha256") != ids_digest(present):
            return None
        data = path.read_bytes()
        if sha256_bytes(data) != info.get("sha256"):
            warn(f"{path} does not match its checksum; reading the parts instead")
            return None
        try:
            return parse_part(data, columns=columns)
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            warn(f"{path} is not readable ({_short(exc)}); reading the parts instead")
            return None

    def compact(self) -> Optional[dict[str, Any]]:
        """Write every verified part's rows into rows.parquet (lock holder only) and record its
        checksum and unit set in the manifest; returns that record (None when nothing is done)."""
        rows = self.read_rows()
        if not rows.done:
            return None
        if rows.compacted:
            return self.manifest().get("rows_file")
        sink = pa.BufferOutputStream()
        pq.write_table(rows.table, sink, compression="zstd", write_page_checksum=True,
                       row_group_size=1 << 20)
        data = sink.getvalue().to_pybytes()
        atomic_write_bytes(self.root / ROWS_FILE, data)
        info = {"sha256": sha256_bytes(data), "unit_ids_sha256": ids_digest(rows.done),
                "units": len(rows.done), "rows": rows.table.num_rows}
        self.update_manifest(rows_file=info)
        return info


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
