"""`flexvlm-ray launch`: run a sweep (or --resume one) on Ray workers, then its summary, analysis and report."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import click

from flexvlm_ray.commands.common import (EXIT_ANALYSIS, EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK, MAX_UNITS_HELP,
                                         SET_HELP, fail)


@click.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.option("--num-gpus", type=click.IntRange(min=1), default=None,
              help="GPUs (workers); on a machine without GPUs, this many logical GPUs on the CPU")
@click.option("--address", default=None, help="join an existing Ray cluster (e.g. 'auto')")
@click.option("--output", type=click.Path(file_okay=False), default="results", show_default=True,
              help="runs go to OUTPUT/<sweep>/<run-id>/")
@click.option("--run-id", default=None, help="name of the run folder (default: a timestamp)")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="run the units of RUN_DIR that have no result yet")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--dashboard/--no-dashboard", default=False, show_default=True,
              help="start the Ray dashboard (on 127.0.0.1) for live metrics")
@click.option("--analyze/--no-analyze", default=True, show_default=True,
              help="write the experiment's analysis (figures, JSON) when the run completes")
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
@click.option("--max-units", type=click.IntRange(min=1), default=None, help=MAX_UNITS_HELP)
def launch(spec: Optional[str], num_gpus: Optional[int], address: Optional[str], output: str,
           run_id: Optional[str], resume_dir: Optional[str], overrides: tuple[str, ...],
           dashboard: bool, analyze: bool, progress: bool, max_units: Optional[int]) -> None:
    """Run a sweep (or --resume one) on Ray workers, one per GPU (at most one per unit).
    One driver at a time per run folder (RUN_DIR/.lock)."""
    from flexvlm_ray.run import launch as runner
    from flexvlm_ray.run.scheduler import SweepAborted
    from flexvlm_ray.spec.load import SpecError

    if bool(spec) == bool(resume_dir):
        fail("give either SPEC or --resume RUN_DIR")
    if resume_dir and overrides:
        fail("--set cannot change a run being resumed (its spec is frozen in RUN_DIR/spec.yaml)")
    try:
        if resume_dir:
            run_dir, summary = runner.resume(run_dir=resume_dir, num_gpus=num_gpus, address=address,
                                             dashboard=dashboard, progress=progress)
        else:
            run_dir, summary = runner.launch(spec_path=spec, overrides=overrides, num_gpus=num_gpus,
                                             address=address, output=output, run_id=run_id,
                                             dashboard=dashboard, progress=progress, max_units=max_units)
    except SpecError as exc:
        fail("\n".join(exc.problems))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    except SweepAborted as exc:
        click.echo(f"error: {exc}", err=True)
        click.echo(_resume_advice(run_dir=exc.run_dir, retryable=exc.retryable), err=True)
        sys.exit(EXIT_FAILURES)
    except runner.RunWriteFailed as exc:  # a write failed mid-run (a full disk): the stored units are kept
        click.echo(f"error: {exc}", err=True)
        click.echo(f"resume with: flexvlm-ray launch --resume {exc.run_dir}", err=True)
        sys.exit(EXIT_FAILURES)
    except OSError as exc:  # before the run folder exists
        fail(f"cannot write {output}: {exc.strerror or exc}")
    except RuntimeError as exc:  # anything else that stopped the driver: one line, no traceback
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_FAILURES)
    except runner.RunInterrupted as exc:
        click.echo(f"\ninterrupted; the units stored so far are kept in {exc.run_dir}", err=True)
        click.echo(f"resume with: flexvlm-ray launch --resume {exc.run_dir}" if exc.resumable else
                   "a search: tune run cannot be resumed; launch the spec again under a new --run-id", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("\ninterrupted before the run started; nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    analysis_ok = _report(run_dir=run_dir, summary=summary, analyze=analyze)
    sys.exit(EXIT_FAILURES if not summary.ok else EXIT_OK if analysis_ok else EXIT_ANALYSIS)


def _resume_advice(*, run_dir: Optional[Path], retryable: bool) -> str:
    where = str(run_dir) if run_dir else "RUN_DIR"
    if retryable:
        return f"a retry can succeed; resume with: flexvlm-ray launch --resume {where}"
    return (f"this error will repeat as it is: fix its cause (spec, files, cluster) first, then resume with: "
            f"flexvlm-ray launch --resume {where}")


def _report(*, run_dir: Path, summary, analyze: bool) -> bool:
    """Print the summary and write the analysis and the HTML report, each step on its own: a step
    that fails prints one line naming it and its cause, and the others still run. True when every
    step succeeded. The stored rows are never touched."""
    click.echo(f"\nrun: {run_dir}")
    click.echo(f"units: {summary.total} ({summary.skipped} skipped as done), ran {summary.done} ok, "
               f"{summary.failed} failed; {summary.rows} rows in {summary.wall_s:.1f} s")
    steps = [("summary table", lambda: _print_summary(run_dir))]
    if analyze:
        steps += [("experiment analysis", lambda: _write_analysis(run_dir)),
                  ("report", lambda: _write_report(run_dir))]
    ok = True
    started = time.perf_counter()
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # one failing step costs only itself
            ok = False
            click.echo(_step_failure(name, exc), err=True)
    _walltime_line(run_dir=run_dir, summary=summary, analysis_s=time.perf_counter() - started)
    if not summary.ok:
        _failure_advice(run_dir)
    return ok


def _walltime_line(*, run_dir: Path, summary, analysis_s: float) -> None:
    """The run's wall-time breakdown with the summary and analysis time added (RUN_DIR/walltime.json)."""
    breakdown = getattr(summary, "breakdown", None)
    if not breakdown:
        return
    from flexvlm_ray.run.launch import write_walltime

    try:
        breakdown = write_walltime(run_dir, driver={**breakdown["driver_s"], "analysis_s": analysis_s},
                                   workers=breakdown["workers"], replace_last=True)
    except OSError as exc:
        click.echo(f"walltime.json not updated: {exc.strerror or exc}", err=True)
    click.echo(breakdown["line"])


def _step_failure(name: str, exc: BaseException) -> str:
    from flexvlm_ray.analysis.registry import AnalysisError

    if isinstance(exc, AnalysisError):
        return f"{exc} (the run's rows are kept; rerun with: flexvlm-ray analyze RUN_DIR)"
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{name} failed: {type(exc).__name__}: {lines[-1] if lines else ''} (the run's rows are kept)"


def _print_summary(run_dir: Path) -> None:
    from flexvlm_ray.analysis.summary import format_summary
    from flexvlm_ray.store.reader import load_frame

    click.echo(format_summary(load_frame(run_dir)))


def _write_analysis(run_dir: Path) -> None:
    from flexvlm_ray.analysis.registry import analyze_run

    written = analyze_run(run_dir)
    if written:
        click.echo(f"analysis: {len(written)} files in {Path(run_dir) / 'analysis'}")


def _write_report(run_dir: Path) -> None:
    from flexvlm_ray.analysis.report import build_report

    click.echo(f"report: {build_report([run_dir], out=Path(run_dir) / 'report.html')}")


def _failure_advice(run_dir: Path) -> None:
    """Which failed units a --resume can fix (a dead worker, out of memory, a timeout) and which
    will fail the same way again (a missing file, a bad config, a bug)."""
    from collections import Counter

    from flexvlm_ray.run.launch import run_status
    from flexvlm_ray.run.scheduler import retry_can_help

    failures = run_status(run_dir)["failures"]
    retry = Counter(f["error_type"] for f in failures if retry_can_help(error_type=f["error_type"], message=f["message"]))
    repeat = [f for f in failures if not retry_can_help(error_type=f["error_type"], message=f["message"])]
    click.echo(f"{len(failures)} units failed (details: flexvlm-ray status {run_dir})", err=True)
    if repeat:
        kinds = Counter(f["error_type"] for f in repeat)
        first = repeat[0]["message"].strip().splitlines()
        click.echo(f"  {len(repeat)} will fail the same way on a retry ({', '.join(f'{k}: {n}' for k, n in kinds.items())}; "
                   f"e.g. {first[-1][:160] if first else ''}): fix the cause (files, environment, code) first, then "
                   f"resume; a changed spec needs a new run", err=True)
    if retry:
        click.echo(f"  {sum(retry.values())} may succeed on a retry ({', '.join(f'{k}: {n}' for k, n in retry.items())}): "
                   f"flexvlm-ray launch --resume {run_dir}", err=True)
