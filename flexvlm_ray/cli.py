"""The flexvlm-ray command line.

Exit codes: 0 ok; 1 units failed (or the run stopped before its units ran); 2 bad input
(nothing started, nothing written); 3 the run's rows are stored but an analysis step failed;
4 (`status`) units are pending: none failed, the run is not finished; 130 interrupted (Ctrl-C).

Each command parses its options and calls one function; heavy imports stay inside commands.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

EXIT_OK, EXIT_FAILURES, EXIT_BAD_INPUT, EXIT_ANALYSIS, EXIT_PENDING, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
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
    from flexvlm_ray.run.scheduler import SweepAborted
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
    except SweepAborted as exc:
        click.echo(f"error: {exc}", err=True)
        click.echo(_resume_advice(run_dir=exc.run_dir, retryable=exc.retryable), err=True)
        sys.exit(EXIT_FAILURES)
    except runner.RunWriteFailed as exc:  # a write failed mid-run (a full disk): the stored units are kept
        click.echo(f"error: {exc}", err=True)
        click.echo(f"resume with: flexvlm-ray launch --resume {exc.run_dir}", err=True)
        sys.exit(EXIT_FAILURES)
    except OSError as exc:  # before the run folder exists
        _fail(f"cannot write {output}: {exc.strerror or exc}")
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
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # one failing step costs only itself
            ok = False
            click.echo(_step_failure(name, exc), err=True)
    if not summary.ok:
        _failure_advice(run_dir)
    return ok


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


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the status as JSON")
def status(run_dir: str, as_json: bool) -> None:
    """Done / failed / pending units, rows, per-GPU counts, failures by error type.

    Exit 0: every unit done; 1: units failed; 4: units pending (none failed); 2: not a run folder."""
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
    sys.exit(EXIT_FAILURES if info["failed"] else EXIT_PENDING if info["pending"] else EXIT_OK)


@main.command()
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
        _fail("--out goes with --combine (a single run's analysis goes to RUN_DIR/analysis/)")
    if combine is not None:
        if out_dir is None:
            _fail("--combine needs --out DIR")
        if combine not in combined_names():
            _fail(f"unknown combined analysis {combine!r}; allowed: {', '.join(combined_names())}")
        try:
            written = analyze_combined(combine, run_dirs=list(run_dirs), out_dir=out_dir)
        except AnalysisError as exc:
            click.echo(str(exc), err=True)
            sys.exit(EXIT_ANALYSIS)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        for path in written:
            click.echo(str(path))
        return
    failed = False
    for run_dir in run_dirs:
        try:
            written = analyze_run(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
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


@main.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="HTML file (default: RUN_DIR/report.html for one folder, ./report.html for several)")
def report(folders: tuple[str, ...], out_file: Optional[str]) -> None:
    """One self-contained HTML page (figures embedded) over run folders and combined-analysis folders."""
    from flexvlm_ray.analysis.report import build_report

    out = out_file or (str(Path(folders[0]) / "report.html") if len(folders) == 1 else "report.html")
    try:
        click.echo(str(build_report(list(folders), out=out)))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _register_plugin_commands() -> None:
    from flexvlm_ray.commands.calibrate import calibrate_command
    from flexvlm_ray.commands.verify_knobs import verify_knobs_command

    main.add_command(verify_knobs_command, name="verify-knobs")
    main.add_command(calibrate_command, name="calibrate")


_PASS_THROUGH = {"context_settings": {"ignore_unknown_options": True, "allow_extra_args": True,
                                      "help_option_names": []}}


@main.command("train-tiny", **_PASS_THROUGH)
@click.pass_context
def train_tiny(ctx: click.Context) -> None:
    """Train the tiny flexmoe model on the synthetic sets (--help lists its options)."""
    from flexvlm_ray.tiny.train import main as train_main

    train_main(ctx.args)


@main.command("eval-tiny", **_PASS_THROUGH)
@click.pass_context
def eval_tiny(ctx: click.Context) -> None:
    """Score a trained tiny model folder at full and reduced knobs (--help lists its options)."""
    from flexvlm_ray.tiny.evaluate import main as eval_main

    eval_main(ctx.args)


_register_plugin_commands()

if __name__ == "__main__":
    main()
