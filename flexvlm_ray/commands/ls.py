"""`flexvlm-ray ls`: what is registered (built in, or added by another package's entry points)."""
from __future__ import annotations

import click

KINDS = ("models", "datasets", "metrics", "experiments")


def registered(kind: str) -> list[tuple[str, str]]:
    """(name, where it comes from) for every plug-in of ``kind``, without loading lazy ones."""
    if kind == "models":
        from flexvlm_ray.models import MODELS

        return [(name, MODELS.target(name)) for name in MODELS.names()]
    if kind == "datasets":
        from flexvlm_ray.data import DATASETS

        return [(name, _describe_dataset(DATASETS.get(name))) for name in DATASETS.names()]
    if kind == "metrics":
        from flexvlm_ray.metrics import METRICS

        return [(name, METRICS.target(name)) for name in METRICS.names()]
    from flexvlm_ray.analysis.registry import experiment_modules

    return sorted(experiment_modules().items())


def _describe_dataset(entry) -> str:
    source = "synthetic" if entry.synthetic else (entry.hub_id or "local files")
    return f"{source}; splits {', '.join(entry.splits)}; metric {entry.metric}"


@click.command("ls")
@click.argument("kind", type=click.Choice(KINDS))
def ls(kind: str) -> None:
    """List the registered models, datasets, metrics or experiments (analyses)."""
    rows = registered(kind)
    width = max((len(name) for name, _ in rows), default=0)
    for name, where in rows:
        click.echo(f"{name:<{width}}  {where}")
