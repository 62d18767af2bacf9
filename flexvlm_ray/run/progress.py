"""What the driver tells the user while a run goes: one-line messages and the progress bar."""
from __future__ import annotations

import sys


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress_bar(*, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="unit", disable=not enabled, dynamic_ncols=True)
