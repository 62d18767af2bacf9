"""`flexvlm-ray analyze`: a run's analysis, or one analysis over several runs (--combine)."""
from __future__ import annotations

import sys
from typing import Optional

import click

from flexvlm_ray.commands.common import EXIT_ANALYSIS, fail


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--combine", default=None, metavar="NAME",
              help="one analysis over all RUN_DIRS, e.g. motivation_exp5 (runs of motivation_exp3 and _exp4)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="folder for the --combine analysis (required with --combine)")
def analyze(run_dirs: tuple[str, ...], combine: Optional[str], out_dir: Optional[str]) -> None:
    """Write each run's analysis (JSON and 300-DPI figures) into RUN_DIR/analysis/, or with
    --combine NAME --out DIR one analysis over several runs into DIR."""
    from flexvlm_ray.analysis.registry import AnalysisError, analyze_combined, analyze_run, combined_names

    if combine is None and out_dir is not None:
        fail("--out goes with --combine (a single run's analysis goes to RUN_DIR/analysis/)")
    if combine is not None:
        if out_dir is None:
            fail("--combine needs --out DIR")
        if combine not in combined_names():
            fail(f"unknown combined analysis {combine!r}; allowed: {', '.join(combined_names())}")
        try:
            written = analyze_combined(combine, run_dirs=list(run_dirs), out_dir=out_dir)
        except AnalysisError as exc:
            click.echo(str(exc), err=True)
            sys.exit(EXIT_ANALYSIS)
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
        for path in written:
            click.echo(str(path))
        return
    failed = False
    for run_dir in run_dirs:
        try:
            written = analyze_run(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
        except AnalysisError as exc:  # the other runs' analyses still run
            click.echo(f"{run_dir}: {exc}", err=True)
            failed = True
            continue
        for path in written:
            click.echo(str(path))
        if not written:
            click.echo(f"{run_dir}: no analysis registered for this run's experiment", err=True)
    if failed:
        sys.exit(EXIT_ANALYSIS)
