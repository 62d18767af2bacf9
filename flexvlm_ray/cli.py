"""The flexvlm-ray command line. Exit codes: 0 ok, 1 the run had failures, 2 bad input.

Each command parses its options and calls one function; heavy imports stay inside commands.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

EXIT_OK, EXIT_FAILURES, EXIT_BAD_INPUT = 0, 1, 2
SET_HELP = "override a spec key, e.g. --set datasets.0.num_samples=20 (repeatable)"
MAX_UNITS_HELP = "refuse specs that expand to more work units than this (default 100000)"
MAX_LINE_CHARS = 300


def _fail(message: str) -> None:
    lines = [line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS - 25] + f" ... ({len(line)} chars)"
             for line in message.splitlines()[:60]]
    click.echo("\n".join(lines), err=True)
    sys.exit(EXIT_BAD_INPUT)


def _load(spec_path: str, overrides: tuple[str, ...], max_units: Optional[int] = None):
    from flexvlm_ray.spec.expand import expand
    from flexvlm_ray.spec.load import SpecError, load_spec

    try:
        spec = load_spec(spec_path, overrides=overrides, max_units=max_units)
    except SpecError as exc:
        _fail("\n".join(exc.problems))
    return spec, expand(spec)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flexvlm-ray")
def main() -> None:
    """Sweep VLM knobs on Ray GPU workers; measure per-stage latency and quality."""


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--max-units", type=click.IntRange(min=1), default=None, help=MAX_UNITS_HELP)
def validate(spec: str, overrides: tuple[str, ...], max_units: Optional[int]) -> None:
    """Check a sweep spec; print 'ok: N work units' or one line per problem."""
    _, units = _load(spec, overrides, max_units)
    click.echo(f"ok: {len(units)} work units")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--num-gpus", type=click.IntRange(min=1), default=None, help="GPUs to plan for")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--all", "show_all", is_flag=True, help="list every unit (default: the first 40)")
@click.option("--max-units", type=click.IntRange(min=1), default=None, help=MAX_UNITS_HELP)
def plan(spec: str, num_gpus: Optional[int], overrides: tuple[str, ...], show_all: bool,
         max_units: Optional[int]) -> None:
    """Dry run: the expanded work units and their count. Starts no Ray, touches no GPU."""
    spec_obj, units = _load(spec, overrides, max_units)
    header = f"{'#':>5}  {'unit_id':16}  {'dataset':16} {'shard':>7} {'rep':>3} {'gpu':8} " \
             f"{'crops':>5} {'top_k':>5} {'blocks':>6} {'policy':10} {'new_tok':>7}"
    click.echo(header)
    shown = units if show_all else units[:40]
    for u in shown:
        k = u.knobs
        click.echo(f"{u.index:>5}  {u.unit_id:16}  {u.dataset:16} {f'{u.shard + 1}/{u.num_shards}':>7} "
                   f"{u.repeat:>3} {u.gpu_type or 'any':8} {_d(k.max_crops):>5} {_d(k.top_k):>5} "
                   f"{_d(k.active_blocks):>6} {k.block_policy:10} {k.max_new_tokens:>7}")
    if len(shown) < len(units):
        click.echo(f"... {len(units) - len(shown)} more (--all lists them)")
    configs = len({u.config_key for u in units})
    line = f"{len(units)} work units ({configs} knob configurations) for sweep '{spec_obj.name}'"
    if num_gpus:
        workers = min(num_gpus, len(units))
        line += f"; {workers} workers, about {-(-len(units) // max(workers, 1))} units each"
    click.echo(line)


def _d(value: Optional[int]) -> str:
    return "dflt" if value is None else str(value)


@main.command()
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
    from flexvlm_ray.spec.load import SpecError

    if bool(spec) == bool(resume_dir):
        _fail("give either SPEC or --resume RUN_DIR")
    if resume_dir and overrides:
        _fail("--set cannot change a run being resumed (its spec is frozen in RUN_DIR/spec.yaml)")
    try:
        if resume_dir:
            run_dir, summary = runner.resume(run_dir=resume_dir, num_gpus=num_gpus, address=address,
                                             dashboard=dashboard, progress=progress)
        else:
            run_dir, summary = runner.launch(spec_path=spec, overrides=overrides, num_gpus=num_gpus,
                                             address=address, output=output, run_id=run_id,
                                             dashboard=dashboard, progress=progress, max_units=max_units)
    except SpecError as exc:
        _fail("\n".join(exc.problems))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    except OSError as exc:  # before the run folder exists (after, it is a RunInterrupted)
        _fail(f"cannot write {output}: {exc.strerror or exc}")
    except RuntimeError as exc:
        click.echo(f"error: {exc}", err=True)
        where = getattr(exc, "run_dir", None) or resume_dir or "RUN_DIR"
        click.echo(f"resume with: flexvlm-ray launch --resume {where}", err=True)
        sys.exit(EXIT_FAILURES)
    _report(run_dir=run_dir, summary=summary, analyze=analyze)
    sys.exit(EXIT_OK if summary.ok else EXIT_FAILURES)


def _report(*, run_dir: Path, summary, analyze: bool) -> None:
    from analysis.summary import format_summary
    from flexvlm_ray.store.reader import load_frame

    click.echo(f"\nrun: {run_dir}")
    click.echo(f"units: {summary.total} ({summary.skipped} skipped as done), ran {summary.done} ok, "
               f"{summary.failed} failed; {summary.rows} rows in {summary.wall_s:.1f} s")
    click.echo(format_summary(load_frame(run_dir)))
    if analyze:
        from analysis.registry import analyze_run
        written = analyze_run(run_dir)
        if written:
            click.echo(f"analysis: {len(written)} files in {Path(run_dir) / 'analysis'}")
    if not summary.ok:
        click.echo(f"{summary.failed} units failed (see `flexvlm-ray status {run_dir}`); "
                   f"retry them with: flexvlm-ray launch --resume {run_dir}", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the status as JSON")
def status(run_dir: str, as_json: bool) -> None:
    """Done / failed / pending units, rows, per-GPU counts, failures by error type."""
    from flexvlm_ray.run.launch import run_status

    try:
        info = run_status(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(f"{info['run_dir']}  sweep {info['sweep']}  run {info['run_id']}  ({info['status']})")
        click.echo(f"units: {info['units']}  done {info['done']}  failed {info['failed']}  "
                   f"pending {info['pending']}  rows {info['rows']}"
                   + (f"  corrupt {info['corrupt']} (re-run on --resume)" if info["corrupt"] else ""))
        for gpu, n in sorted(info["units_per_gpu"].items()):
            click.echo(f"  {gpu}: {n} units")
        for kind, n in sorted(info["failures_by_type"].items()):
            click.echo(f"  failures {kind}: {n}")
        for failure in info["failures"][:20]:
            click.echo(f"    {failure['unit_id']} {failure['error_type']}: {failure['message'][:160]}")
    sys.exit(EXIT_FAILURES if info["failed"] else EXIT_OK)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--combine", default=None, metavar="NAME",
              help="one analysis over all RUN_DIRS, e.g. motivation_exp5 (runs of motivation_exp3 and _exp4)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="folder for the --combine analysis (required with --combine)")
def analyze(run_dirs: tuple[str, ...], combine: Optional[str], out_dir: Optional[str]) -> None:
    """Write each run's analysis (JSON and 300-DPI figures) into RUN_DIR/analysis/, or with
    --combine NAME --out DIR one analysis over several runs into DIR."""
    from analysis.registry import analyze_combined, analyze_run, combined_names

    if combine is None and out_dir is not None:
        _fail("--out goes with --combine (a single run's analysis goes to RUN_DIR/analysis/)")
    if combine is not None:
        if out_dir is None:
            _fail("--combine needs --out DIR")
        if combine not in combined_names():
            _fail(f"unknown combined analysis {combine!r}; allowed: {', '.join(combined_names())}")
        try:
            written = analyze_combined(combine, run_dirs=list(run_dirs), out_dir=out_dir)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        for path in written:
            click.echo(str(path))
        return
    for run_dir in run_dirs:
        try:
            written = analyze_run(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        for path in written:
            click.echo(str(path))
        if not written:
            click.echo(f"{run_dir}: no analysis registered for this run's experiment", err=True)


@main.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="HTML file (default: RUN_DIR/report.html for one folder, ./report.html for several)")
def report(folders: tuple[str, ...], out_file: Optional[str]) -> None:
    """One self-contained HTML page (figures embedded) over run folders and combined-analysis folders."""
    from analysis.report import build_report

    out = out_file or (str(Path(folders[0]) / "report.html") if len(folders) == 1 else "report.html")
    try:
        click.echo(str(build_report(list(folders), out=out)))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _register_plugin_commands() -> None:
    from flexvlm_ray.estimator_cli import calibrate_command
    from flexvlm_ray.knobs.verify import verify_knobs_command

    main.add_command(verify_knobs_command, name="verify-knobs")
    main.add_command(calibrate_command, name="calibrate")


_register_plugin_commands()

if __name__ == "__main__":
    main()
