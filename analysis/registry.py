"""Analyses register by experiment name; ``analyze_run`` picks the run's one.

Loading is lazy: which module registers which experiment is read from the modules' source (the
string arguments of their ``@register_analysis`` / ``@register_combined_analysis`` decorators),
and only that module is imported, so a module whose optional package is missing (or that has a
bug) breaks only its own analyses. ``AnalysisError`` carries one line naming the analysis and
the cause; ``launch`` prints it and keeps the stored rows and the other steps.
"""
from __future__ import annotations

import ast
import functools
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


class AnalysisError(RuntimeError):
    """An analysis that could not be loaded or failed while running; one line."""

    def __init__(self, name: str, exc: BaseException) -> None:
        cause = str(exc).strip().splitlines()
        super().__init__(f"analysis {name} failed: {type(exc).__name__}: {cause[-1] if cause else ''}".rstrip(": "))
        self.name = name


_DECORATORS = {"register_analysis": "single", "register_combined_analysis": "combined"}


@functools.lru_cache(maxsize=1)
def _module_index() -> dict[tuple[str, str], str]:
    """(kind, experiment name) -> module that registers it, read from the package's source."""
    import flexvlm_ray.analysis as analysis

    index: dict[tuple[str, str], str] = {}
    for module in pkgutil.iter_modules(analysis.__path__):
        path = Path(analysis.__path__[0]) / f"{module.name}.py"
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in _DECORATORS:
                kind = _DECORATORS[node.func.id]
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        index[(kind, arg.value)] = f"{analysis.__name__}.{module.name}"
    return index


def experiment_modules() -> dict[str, str]:
    """Experiment name -> where its analysis comes from (a module of this package, or an entry point
    of the group ``flexvlm_ray.analyses``), without importing any analysis."""
    found = {name: module for (kind, name), module in _module_index().items() if kind == "single"}
    for name in ANALYSES.names():
        found.setdefault(name, ANALYSES.target(name))
    return dict(sorted(found.items()))


def load_analysis(experiment: str, *, kind: str = "single") -> AnalysisFn | None:
    """The analysis registered for ``experiment`` (importing only its module); None when no module
    registers it; AnalysisError when its module fails to import."""
    registry = ANALYSES if kind == "single" else COMBINED
    try:
        if experiment not in registry:  # registered names include lazy ones and entry points
            module = _module_index().get((kind, experiment))
            if module is None:
                return None
            importlib.import_module(module)
        return registry.get(experiment) if experiment in registry else None
    except Exception as exc:  # a missing optional package or a bug: only this analysis is lost
        raise AnalysisError(experiment, exc) from exc


def _import_all() -> None:
    """Import every module of the analysis package, so each registers its experiments."""
    import flexvlm_ray.analysis as analysis

    for module in pkgutil.iter_modules(analysis.__path__):
        importlib.import_module(f"{analysis.__name__}.{module.name}")


def analyze_run(run_dir: str | Path) -> list[Path]:
    """Run the analysis registered for the run's experiment; [] when none is. A failure to load
    or run it is an AnalysisError naming the experiment and the cause."""
    from flexvlm_ray.store.writer import RunStore

    manifest = RunStore(run_dir).manifest()
    experiment = manifest.get("experiment")
    fn = load_analysis(experiment)
    if fn is None:
        return []
    out_dir = Path(run_dir) / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return fn(rows=_rows(run_dir, manifest), out_dir=out_dir, manifest={**manifest, "run_dir": str(run_dir)})
    except Exception as exc:
        raise AnalysisError(experiment, exc) from exc


def _rows(run_dir: str | Path, manifest: dict):
    """A sweep's rows, or for a run folder that is not a sweep (E5's training trials) the Parquet file
    its manifest names in ``table_file``."""
    from flexvlm_ray.store.reader import load_frame

    name = manifest.get("table_file")
    if name is None:
        return load_frame(run_dir)
    import pandas as pd

    path = Path(run_dir) / name
    if Path(name).name != name or not path.is_file():
        raise FileNotFoundError(f"{run_dir}: the manifest's table_file {name!r} is not a file of the run folder")
    return pd.read_parquet(path)


def combined_names() -> list[str]:
    return sorted({name for kind, name in _module_index() if kind == "combined"} | set(COMBINED.names()))


def analyze_combined(name: str, *, run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Run the combined analysis ``name`` over ``run_dirs`` (one run per input experiment, any
    order); raises ValueError naming the missing or repeated experiments."""
    from flexvlm_ray.store.reader import load_frame
    from flexvlm_ray.store.writer import RunStore

    fn = load_analysis(name, kind="combined")
    if fn is None:
        COMBINED.get(name)  # the unknown-name error listing what is available
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
    try:
        return fn(runs=runs, out_dir=out)
    except Exception as exc:
        raise AnalysisError(name, exc) from exc
