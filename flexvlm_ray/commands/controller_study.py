"""``flexvlm-ray controller-study``: M6 (the controller on workloads it never trained on) and E6 (ablations:
knobs, guardrail, budget feature, mask strategy) on a run's profiled rows, then the m6 / e6 analysis."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from flexvlm_ray.commands.common import analyze_or_exit, fail


@click.command("controller-study")
@click.argument("study", type=click.Choice(["m6", "e6"]))
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="folder for decisions and analysis")
@click.option("--mask-run", type=click.Path(file_okay=False), default=None,
              help="e6: a run whose grid varies block_policy (sweeps/m5_masks.yaml): the mask-strategy ablation")
@click.option("--train-sets", default="shapes_vqa+shapes_caption;shapes_mc+shapes_count", show_default=True,
              help="m6: groups of workloads to train on, ';' between groups, '+' within one")
@click.option("--trainers", default="supervised,ppo", show_default=True, help="E5 trainers, comma list")
@click.option("--seeds", type=click.IntRange(1, 100), default=3, show_default=True, help="seeds 0 .. N-1")
@click.option("--samples", type=click.IntRange(1, 10_000_000), default=10_000, show_default=True,
              help="environment samples per training")
@click.option("--margin", type=click.FloatRange(0, 2, min_open=True), default=0.9, show_default=True,
              help="guardrail: admit configurations estimated <= budget x margin")
@click.option("--no-analysis", is_flag=True, help="skip the analysis")
def controller_study(study: str, run_dir: str, out_dir: str, mask_run: Optional[str], train_sets: str, trainers: str,
                     seeds: int, samples: int, margin: float, no_analysis: bool) -> None:
    """STUDY (m6 or e6) on RUN_DIR's profiled rows (a grid sweep, or an E4 run's training rows).

    Each variant's controller (E4's learned network, trained by each E5 trainer on the variant's training
    requests) decides on held-out requests at E4's budgets (0.35 ... 1.0 x the workload's full P50); the
    rows give each decision's measured quality and T_total. Writes OUT/manifest.json, decisions.parquet and
    OUT/analysis/. See docs/E6_M5_M6.md.
    """
    from flexvlm_ray.control.train import TRAINERS

    names = [t.strip() for t in trainers.split(",") if t.strip()]
    for name in names:
        if name not in TRAINERS:
            fail(f"--trainers: unknown trainer {name!r}; allowed: {', '.join(TRAINERS.names())}")
    groups = [tuple(d.strip() for d in g.split("+") if d.strip()) for g in train_sets.split(";") if g.strip()]
    for path in [run_dir] + ([mask_run] if mask_run else []):
        if not (Path(path) / "manifest.json").is_file():
            fail(f"{path}: not a run folder (no manifest.json)")
    from flexvlm_ray.run.controller_study import run_controller_study

    try:
        out = run_controller_study(study=study, run_dir=run_dir, out_dir=out_dir, trainers=names,
                                   seeds=list(range(seeds)), samples=samples, mask_run=mask_run, train_sets=groups,
                                   margin=margin, say=lambda m: click.echo(m, err=True))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if not no_analysis:
        analyze_or_exit(out)
