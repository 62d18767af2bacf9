"""How a run chooses its work units: strategies registered by name over one ``launch._execute``.

* ``grid``: every unit of the spec's knob grid, expanded up front (resumable).
* ``tune``: an adaptive multi-objective search that asks Ray Tune's searcher for configs and runs their
  units on the same worker pool (``run.tune_search``; not resumable: the searcher's state is not stored).
* ``closed_loop``: E4's controller in the loop: training and reference units, then per request the
  knobs a policy picks under a budget (``run.closed_loop``; resumable).

A strategy says which units the run folder lists at creation, which driver runs them and how, what it
adds to the manifest, and whether ``--resume`` applies. Another package registers one through the
entry-point group ``flexvlm_ray.strategies``.
"""
from __future__ import annotations

from typing import Any

from flexvlm_ray.registry import Registry
from flexvlm_ray.spec.expand import WorkUnit, expand
from flexvlm_ray.spec.schema import SweepSpec


class Strategy:
    """The grid: every unit up front, run by the plain driver."""

    name = "grid"
    resumable = True

    def units(self, spec: SweepSpec) -> list[WorkUnit]:
        return expand(spec)

    def manifest_fields(self, spec: SweepSpec) -> dict[str, Any]:
        return {}

    def driver(self, *, spec: SweepSpec, **common: Any):
        from flexvlm_ray.run.scheduler import SweepDriver

        return SweepDriver(**common)

    def run(self, *, driver: Any, spec: SweepSpec, units: list[WorkUnit]):
        return driver.run(units=units, gpu_types=spec.gpu_types)

    def finished(self, *, driver: Any, store: Any) -> None:
        """A last word to the user once the rows are stored."""


class TuneStrategy(Strategy):
    name = "tune"
    resumable = False

    def units(self, spec: SweepSpec) -> list[WorkUnit]:
        return []   # the searcher decides the units as the run goes

    def manifest_fields(self, spec: SweepSpec) -> dict[str, Any]:
        return {"sweep": spec.name, "experiment": spec.experiment, "search": "tune"}

    def driver(self, *, spec: SweepSpec, **common: Any):
        from flexvlm_ray.run.tune_search import TuneDriver

        return TuneDriver(**common)

    def run(self, *, driver: Any, spec: SweepSpec, units: list[WorkUnit]):
        return driver.run_search(spec=spec)

    def finished(self, *, driver: Any, store: Any) -> None:
        from flexvlm_ray.run.progress import say

        say(f"tune search: {sum(len(s.measured) for s in driver.searches)} configs measured, "
            f"{len(driver.log)} trials; log in {store.root / 'tune_trials.json'}")


class ClosedLoopStrategy(Strategy):
    name = "closed_loop"

    def driver(self, *, spec: SweepSpec, **common: Any):
        from flexvlm_ray.run.closed_loop import ClosedLoopDriver

        return ClosedLoopDriver(spec=spec, **common)


STRATEGIES: Registry[Strategy] = Registry("search strategy", group="flexvlm_ray.strategies", base=Strategy)
for _strategy in (Strategy(), TuneStrategy(), ClosedLoopStrategy()):
    STRATEGIES.register(_strategy.name)(_strategy)


def strategy_of(spec: SweepSpec) -> Strategy:
    """The strategy a spec asks for: ``closed_loop`` when it has a ``control`` section, else ``search``."""
    return STRATEGIES.get("closed_loop" if spec.control is not None else spec.search)
