"""`flexvlm-ray report`: one self-contained HTML page over run folders."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from flexvlm_ray.commands.common import fail


@click.command()
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
        fail(str(exc))
