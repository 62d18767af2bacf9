"""`flexvlm-ray train-tiny` and `eval-tiny`: the tiny model's training and evaluation (argparse options
passed through)."""
from __future__ import annotations

import click

_PASS_THROUGH = {"context_settings": {"ignore_unknown_options": True, "allow_extra_args": True,
                                      "help_option_names": []}}


@click.command("train-tiny", **_PASS_THROUGH)
@click.pass_context
def train_tiny(ctx: click.Context) -> None:
    """Train the tiny flexmoe model on the synthetic sets (--help lists its options)."""
    from flexvlm_ray.tiny.train import main as train_main

    train_main(ctx.args)


@click.command("eval-tiny", **_PASS_THROUGH)
@click.pass_context
def eval_tiny(ctx: click.Context) -> None:
    """Score a trained tiny model folder at full and reduced knobs (--help lists its options)."""
    from flexvlm_ray.tiny.evaluate import main as eval_main

    eval_main(ctx.args)
