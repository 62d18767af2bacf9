"""``flexvlm-ray calibrate``: fit the E3 stage estimator on a run, report held-out error,
optionally recalibrate it to another GPU type's run from K rows."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

EXIT_BAD_INPUT = 2


def _load_rows(run_dir: str):
    from flexvlm_ray.estimator import usable_rows
    from flexvlm_ray.store.reader import load_frame

    try:
        rows = usable_rows(load_frame(run_dir))
    except FileNotFoundError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_BAD_INPUT)
    if rows.empty:
        click.echo(f"{run_dir}: no ok rows with token counts and stage times to fit on", err=True)
        sys.exit(EXIT_BAD_INPUT)
    return rows


def format_errors(title: str, report: dict[str, dict]) -> str:
    lines = [title, f"  {'target':18} {'MAPE %':>8} {'within10':>9} {'rows':>6}"]
    for target, e in report.items():
        lines.append(f"  {target:18} {e['mape']:8.2f} {100 * e['within']:8.1f}% {e['n']:6d}")
    return "\n".join(lines)


@click.command("calibrate")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--on", "other_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="a run of the same sweep on another GPU type: recalibrate to it")
@click.option("--samples", "k", type=click.IntRange(min=0), default=5, show_default=True,
              help="rows of the --on run used to recalibrate (0: the raw transfer)")
@click.option("--holdout", type=click.FloatRange(0.05, 0.9), default=0.3, show_default=True,
              help="share of knob configurations held out for the error report")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="write the estimator JSON here (default: RUN_DIR/estimator.json)")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None,
              help="also write the e3 and m4 analyses (figures, JSON) of the run(s) here")
def calibrate_command(run_dir: str, other_dir: Optional[str], k: int, holdout: float, seed: int,
                      out_path: Optional[str], report_dir: Optional[str]) -> None:
    """Fit the stage-aware latency estimator on RUN_DIR and report its held-out error.

    The fit uses the run's rows of (1 - holdout) of its knob configurations; MAPE and the
    share within +-10% are on the held-out configurations, per stage and T_total. With --on,
    the estimator is recalibrated (one factor per stage) from K rows of OTHER_RUN_DIR and
    its error on OTHER_RUN_DIR's held-out configurations is shown for K=0 and K. The saved
    estimator is the one whose error is reported (recalibrated when --on is given).
    """
    from flexvlm_ray.estimator import (StageEstimator, config_keys, evaluate, predict_timing,
                                       sample_rows, split_configs)

    rows = _load_rows(run_dir)
    train, test = split_configs(rows, holdout=holdout, seed=seed)
    est = StageEstimator.fit(train, meta={"run_dir": str(run_dir), "holdout": holdout, "seed": seed})
    click.echo(f"fitted on {len(train)} rows of {run_dir}; held out {len(test)} rows "
               f"({config_keys(test).nunique()} configurations)")
    click.echo(format_errors("same GPU, held-out configurations:", evaluate(est, test)))
    saved = est
    if other_dir:
        other = _load_rows(other_dir)
        o_train, o_test = split_configs(other, holdout=holdout, seed=seed)
        click.echo(format_errors(f"{other_dir}, raw transfer (K=0):", evaluate(est, o_test)))
        saved = est.recalibrate(sample_rows(o_train, k=k, seed=seed))
        saved.meta["recalibration_run_dir"] = str(other_dir)
        click.echo(format_errors(f"{other_dir}, recalibrated from K={k} rows:", evaluate(saved, o_test)))
        click.echo("stage factors: " + ", ".join(f"{s}={v:.3f}" for s, v in saved.scales.items()))
    timing = predict_timing(saved, rows)
    click.echo(f"predict(): {timing['us_per_call_single']:.1f} us per single-config call, "
               f"{timing['us_per_config_batched']:.3f} us per config in a batch of 10000")
    target = Path(out_path) if out_path else Path(run_dir) / "estimator.json"
    saved.save(target)
    click.echo(f"estimator written to {target}")
    if report_dir:
        from flexvlm_ray.analysis.e3 import analyze_runs

        paths = analyze_runs(run_dirs=[run_dir] + ([other_dir] if other_dir else []), out_dir=report_dir,
                             seed=seed, holdout=holdout)
        click.echo(f"{len(paths)} analysis files written to {report_dir}")
