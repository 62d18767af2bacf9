"""What every subcommand shares: exit codes, option help, one-line failures, loading a spec."""
from __future__ import annotations

import sys
from typing import Optional

import click

EXIT_OK, EXIT_FAILURES, EXIT_BAD_INPUT, EXIT_ANALYSIS, EXIT_PENDING, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
SET_HELP = "override a spec key, e.g. --set datasets.0.num_samples=20 (repeatable)"
MAX_UNITS_HELP = "refuse specs that expand to more work units than this (default 100000)"
MAX_LINE_CHARS = 300


def fail(message: str) -> None:
    """Print the problem (one line each, at most MAX_LINE_CHARS) and exit 2: bad input, nothing started."""
    lines = [line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS - 25] + f" ... ({len(line)} chars)"
             for line in message.splitlines()[:60]]
    click.echo("\n".join(lines), err=True)
    sys.exit(EXIT_BAD_INPUT)


def analyze_or_exit(run_dir) -> None:
    """Run the folder's analysis, print the files it wrote; a failed analysis is one line and exit 3
    (the run's data is kept)."""
    import click

    from flexvlm_ray.analysis.registry import AnalysisError, analyze_run

    try:
        for path in analyze_run(run_dir):
            click.echo(str(path))
    except AnalysisError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_ANALYSIS)


def load_units(spec_path: str, overrides: tuple[str, ...], max_units: Optional[int] = None):
    """The validated spec and its work units; exit 2 with one line per problem."""
    from flexvlm_ray.spec.expand import expand
    from flexvlm_ray.spec.load import SpecError, load_spec

    try:
        spec = load_spec(spec_path, overrides=overrides, max_units=max_units)
    except SpecError as exc:
        fail("\n".join(exc.problems))
    return spec, expand(spec)
