"""Analyses register by experiment name; ``analyze_run`` picks the run's one."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

from flexvlm_ray.registry import Registry

# fn(rows DataFrame, out_dir Path, manifest dict) -> list of written paths
AnalysisFn = Callable[..., list[Path]]
ANALYSES: Registry[AnalysisFn] = Registry("analysis", group="flexvlm_ray.analyses")
# fn(runs {experiment: (rows, manifest)}, out_dir Path) -> list of written paths
COMBINED: Registry[AnalysisFn] = Registry("combined analysis")
COMBINED_INPUTS: dict[str, tuple[str, ...]] = {}


def register_analysis(*experiments: str) -> Callable[[AnalysisFn], AnalysisFn]:
    def decorator(fn: AnalysisFn) -> AnalysisFn:
        for name in experiments:
            ANALYSES.register(name)(fn)
        return fn

    return decorator


def register_combined_analysis(name: str, *, inputs: tuple[str, ...]) -> Callable[[AnalysisFn], AnalysisFn]:
    """An analysis over several runs, one run of each experiment in ``inputs``."""
    def decorator(fn: AnalysisFn) -> AnalysisFn:
        COMBINED.register(name)(fn)
        COMBINED_INPUTS[name] = tuple(inputs)
        return fn

    return decorator


def _import_all() -> None:
    """Import every module of the analysis package, so each registers its experiments."""
    import flexvlm_ray.analysis as analysis

    for module in pkgutil.iter_modules(analysis.__path__):
        importlib.import_module(f"{analysis.__name__}.{module.name}")


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
    return ANALYSES.get(experiment)(rows=load_frame(run_dir), out_dir=out_dir,
                                    manifest={**manifest, "run_dir": str(run_dir)})


def combined_names() -> list[str]:
    _import_all()
    return COMBINED.names()


def analyze_combined(name: str, *, run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Run the combined analysis ``name`` over ``run_dirs`` (one run per input experiment, any
    order); raises ValueError naming the missing or repeated experiments."""
    from flexvlm_ray.store.reader import load_frame
    from flexvlm_ray.store.writer import RunStore

    _import_all()
    fn = COMBINED.get(name)
    needed = COMBINED_INPUTS[name]
    runs: dict[str, tuple] = {}
    for run_dir in run_dirs:
        manifest = {**RunStore(run_dir).manifest(), "run_dir": str(run_dir)}
        experiment = manifest.get("experiment")
        if experiment not in needed:
            raise ValueError(f"{run_dir}: experiment {experiment!r} is not an input of {name}; "
                             f"it needs one run each of {', '.join(needed)}")
        if experiment in runs:
            raise ValueError(f"{name}: two runs of {experiment} given ({runs[experiment][1]['run_dir']}, {run_dir})")
        runs[experiment] = (load_frame(run_dir), manifest)
    missing = [e for e in needed if e not in runs]
    if missing:
        raise ValueError(f"{name} needs one run each of {', '.join(needed)}; missing: {', '.join(missing)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return fn(runs=runs, out_dir=out)
