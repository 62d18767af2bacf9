"""Analyses register by experiment name; ``analyze_run`` picks the run's one."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

from flexvlm_ray.registry import Registry

# fn(rows DataFrame, out_dir Path, manifest dict) -> list of written paths
AnalysisFn = Callable[..., list[Path]]
ANALYSES: Registry[AnalysisFn] = Registry("analysis")


def register_analysis(*experiments: str) -> Callable[[AnalysisFn], AnalysisFn]:
    def decorator(fn: AnalysisFn) -> AnalysisFn:
        for name in experiments:
            ANALYSES.register(name)(fn)
        return fn

    return decorator


def _import_all() -> None:
    """Import every module of the analysis package, so each registers its experiments."""
    import analysis

    for module in pkgutil.iter_modules(analysis.__path__):
        importlib.import_module(f"analysis.{module.name}")


def analyze_run(run_dir: str | Path) -> list[Path]:
    """Run the analysis registered for the run's experiment; [] when none is."""
    from flexvlm_ray.store.reader import load_frame
    from flexvlm_ray.store.writer import RunStore

    _import_all()
    manifest = RunStore(run_dir).manifest()
    experiment = manifest.get("experiment")
    if experiment not in ANALYSES:
        return []
    out_dir = Path(run_dir) / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    return ANALYSES.get(experiment)(rows=load_frame(run_dir), out_dir=out_dir, manifest=manifest)
