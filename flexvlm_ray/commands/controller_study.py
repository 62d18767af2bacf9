"""``flexvlm-ray controller-study``: M6 (the controller on workloads it never trained on) and E6 (ablations:
knobs, guardrail, budget feature, mask strategy; ``portability``: the estimator and guardrail on another model
family or GPU type) on runs' profiled rows, then the m6 / e6 / e6_portability analysis."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from flexvlm_ray.commands.common import analyze_or_exit, fail


@click.command("controller-study")
@click.argument("study", type=click.Choice(["m6", "e6", "portability"]))
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="folder for decisions and analysis")
@click.option("--mask-run", type=click.Path(file_okay=False), default=None,
              help="e6: a run whose grid varies block_policy (sweeps/m5_masks.yaml): the mask-strategy ablation")
@click.option("--train-sets", default="shapes_vqa+shapes_caption;shapes_mc+shapes_count", show_default=True,
              help="m6: groups of workloads to train on, ';' between groups, '+' within one")
@click.option("--other-model", "other_models", multiple=True, type=click.Path(file_okay=False),
              help="m6: a run of the same grid and requests on another model (repeatable): base's controller is "
                   "scored on that model's rows")
@click.option("--trainers", default="supervised,ppo", show_default=True, help="E5 trainers, comma list")
@click.option("--seeds", type=click.IntRange(1, 100), default=3, show_default=True, help="seeds 0 .. N-1")
@click.option("--samples", type=click.IntRange(1, 10_000_000), default=10_000, show_default=True,
              help="environment samples per training")
@click.option("--margin", type=click.FloatRange(0, 2, min_open=True), default=0.9, show_default=True,
              help="guardrail: admit configurations estimated <= budget x margin")
@click.option("--on", "targets", multiple=True, type=click.Path(file_okay=False),
              help="portability: a run of another model family or GPU type (repeatable); RUN_DIR is the source")
@click.option("--k", "ks", default="0,1,3,5", show_default=True,
              help="portability: recalibration row counts K of the target, comma list")
@click.option("--splits", type=click.IntRange(1, 100), default=5, show_default=True,
              help="portability: splits of the target (configurations / requests)")
@click.option("--draws", type=click.IntRange(1, 100), default=5, show_default=True,
              help="portability: draws of the K rows per split")
@click.option("--no-analysis", is_flag=True, help="skip the analysis")
def controller_study(study: str, run_dir: str, out_dir: str, mask_run: Optional[str], train_sets: str,
                     other_models: tuple[str, ...], trainers: str, seeds: int, samples: int, margin: float,
                     targets: tuple[str, ...], ks: str, splits: int, draws: int, no_analysis: bool) -> None:
    """STUDY (m6 or e6) on RUN_DIR's profiled rows (a grid sweep, or an E4 run's training rows).

    Each variant's controller (E4's learned network, trained by each E5 trainer on the variant's training
    requests) decides on held-out requests at E4's budgets (0.35 ... 1.0 x the workload's full P50); the
    rows give each decision's measured quality and T_total. m6 with --other-model: base's controller also
    decides on its held-out requests as another model measured them. Writes OUT/manifest.json,
    decisions.parquet and OUT/analysis/. See docs/E6_M5_M6.md.

    portability: E3's estimator fitted on RUN_DIR's rows, recalibrated from K rows of each --on run; its error
    on the target's held-out configurations and the violation rate of the guardrail it drives on the target's
    held-out requests (margin: --margin; pass 1.0 for E3's and E4's CPU spec's). Writes OUT/manifest.json,
    portability.parquet and OUT/analysis/.
    """
    if study == "portability":
        _portability(run_dir=run_dir, targets=targets, out_dir=out_dir, ks=ks, splits=splits, draws=draws,
                     margin=margin, no_analysis=no_analysis)
        return
    if targets:
        fail("--on is for the portability study")
    if other_models and study != "m6":
        fail("--other-model is for the m6 study")
    from flexvlm_ray.control.train import TRAINERS

    names = [t.strip() for t in trainers.split(",") if t.strip()]
    for name in names:
        if name not in TRAINERS:
            fail(f"--trainers: unknown trainer {name!r}; allowed: {', '.join(TRAINERS.names())}")
    groups = [tuple(d.strip() for d in g.split("+") if d.strip()) for g in train_sets.split(";") if g.strip()]
    _require_runs([run_dir] + ([mask_run] if mask_run else []) + list(other_models))
    from flexvlm_ray.run.controller_study import run_controller_study

    try:
        out = run_controller_study(study=study, run_dir=run_dir, out_dir=out_dir, trainers=names,
                                   seeds=list(range(seeds)), samples=samples, mask_run=mask_run, train_sets=groups,
                                   margin=margin, other_models=other_models, say=lambda m: click.echo(m, err=True))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if not no_analysis:
        analyze_or_exit(out)


def _portability(*, run_dir: str, targets: tuple[str, ...], out_dir: str, ks: str, splits: int, draws: int,
                 margin: float, no_analysis: bool) -> None:
    if not targets:
        fail("portability needs --on TARGET_RUN (another model family or GPU type)")
    try:
        values = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        fail(f"--k: a comma list of integers, got {ks!r}")
    if not values or min(values) < 0:
        fail(f"--k: non-negative row counts, got {ks!r}")
    _require_runs([run_dir, *targets])
    from flexvlm_ray.analysis.portability import run_portability

    try:
        out = run_portability(source_dir=run_dir, target_dirs=list(targets), out_dir=out_dir, ks=values,
                                    splits=splits, repeats=draws, margin=margin)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if not no_analysis:
        analyze_or_exit(out)


def _require_runs(paths: list[str]) -> None:
    """A one-line failure (exit 2) for the first path that is not a run folder."""
    for path in paths:
        if not (Path(path) / "manifest.json").is_file():
            fail(f"{path}: not a run folder (no manifest.json)")
