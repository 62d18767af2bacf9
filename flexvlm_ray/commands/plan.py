"""`flexvlm-ray plan`: the expanded work units of a spec (a dry run)."""
from __future__ import annotations

from typing import Optional

import click

from flexvlm_ray.commands.common import MAX_UNITS_HELP, SET_HELP, load_units


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--num-gpus", type=click.IntRange(min=1), default=None, help="GPUs to plan for")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--all", "show_all", is_flag=True, help="list every unit (default: the first 40)")
@click.option("--max-units", type=click.IntRange(min=1), default=None, help=MAX_UNITS_HELP)
def plan(spec: str, num_gpus: Optional[int], overrides: tuple[str, ...], show_all: bool,
         max_units: Optional[int]) -> None:
    """Dry run: the expanded work units and their count. Starts no Ray, touches no GPU."""
    spec_obj, units = load_units(spec, overrides, max_units)
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
