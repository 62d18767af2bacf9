"""`flexvlm-ray validate`: check a spec at the edge (no Ray, no torch)."""
from __future__ import annotations

from typing import Optional

import click

from flexvlm_ray.commands.common import MAX_UNITS_HELP, SET_HELP, load_units


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--max-units", type=click.IntRange(min=1), default=None, help=MAX_UNITS_HELP)
def validate(spec: str, overrides: tuple[str, ...], max_units: Optional[int]) -> None:
    """Check a sweep spec; print 'ok: N work units' or one line per problem."""
    _, units = load_units(spec, overrides, max_units)
    click.echo(f"ok: {len(units)} work units")
