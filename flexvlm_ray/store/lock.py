"""One writer per run folder: an exclusive ``flock`` on ``RUN_DIR/.lock`` held by the live driver.

The lock file names its holder (host, pid, start time). The kernel drops the lock when the holder
dies, however it dies (SIGKILL included), so a lock file whose holder is gone is stale by
construction: the next writer takes it over and says whose it was. A second writer while the
holder lives is refused with one line naming the holder. Readers never take the lock; they only
ask whether a live driver holds it (``holder``).
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

LOCK_NAME = ".lock"


class RunLocked(ValueError):
    """Another live process holds the run folder's lock."""


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {info.get('started', '?')})"


def _read_info(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        info = json.loads(data.decode()) if data.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder's lock for the block (creating the folder)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)
        self.path = self.root / LOCK_NAME
        self.fd: Optional[int] = None
        self.took_over: dict[str, Any] = {}  # the previous (dead) holder, when there was one

    def acquire(self, *, attempts: int = 20) -> "RunLock":
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(attempts):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                info = _read_info(fd)
                # a reader's shared probe holds it for microseconds and names nobody: try again
                if info or attempt == attempts - 1:
                    os.close(fd)
                    raise RunLocked(f"{self.root} is being written by {_describe(info)}; wait for that run "
                                    f"to end (or stop it), then resume with `flexvlm-ray launch --resume "
                                    f"{self.root}`") from None
                time.sleep(0.05)
        self.took_over = _read_info(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no holder behind
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The live holder of the run folder's lock ({} when it names nobody), or None when no live
    process holds it. Takes the lock shared for an instant; needs no write access."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
