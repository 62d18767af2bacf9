"""`flexvlm-ray status`: what a run folder holds."""
from __future__ import annotations

import json
import sys

import click

from flexvlm_ray.commands.common import EXIT_FAILURES, EXIT_OK, EXIT_PENDING, fail


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the status as JSON")
def status(run_dir: str, as_json: bool) -> None:
    """Done / failed / pending units, rows, per-GPU counts, failures by error type.

    Exit 0: every unit done; 1: units failed; 4: units pending (none failed); 2: not a run folder."""
    from flexvlm_ray.run.launch import run_status

    try:
        info = run_status(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
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
