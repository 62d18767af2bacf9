"""``search: tune``: an adaptive multi-objective search over the spec's knob grid.

One Ray Tune searcher (``OptunaSearch`` with metric [latency, quality], mode [min, max]; the
optuna sampler is TPE, NSGA-II or random) per dataset (workload). The worker pool is the
grid driver's: the driver asks a searcher for a config (``suggest``), expands that single
config with the grid's expansion code (so its units get the ids they have in the full grid),
runs the units on whichever workers are free, and reports (``on_trial_complete``) the config's
P50 ``T_total`` and mean score. A suggestion of an already measured config is answered from
the store without running anything and does not count against ``tune.num_samples`` (the
number of distinct configs measured per dataset). At most one config per worker (+1) is in
flight. The trial log goes to RUN_DIR/tune_trials.json.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from types import SimpleNamespace
from typing import Any, Optional

from flexvlm_ray.knobs.base import INT_KNOBS
from flexvlm_ray.searchers import KNOBS, config_key, full_config, make_searcher  # noqa: F401  (re-exported)
from flexvlm_ray.run.progress import progress_bar
from flexvlm_ray.run.scheduler import RunSummary, SweepDriver
from flexvlm_ray.spec.expand import WorkUnit, expand, knob_grid
from flexvlm_ray.spec.schema import KnobGrid, SweepSpec, TuneSpec, grid_values
from flexvlm_ray.store.writer import RunStore, atomic_write_bytes, atomic_write_json

SUGGESTIONS_PER_SAMPLE = 20  # a searcher that keeps repeating itself stops after this many


def search_space(spec: SweepSpec) -> dict[str, list]:
    """Every knob's values in the grid (block_policy only where active_blocks is set)."""
    k = spec.knobs
    space = {name: grid_values(getattr(k, name)) for name in INT_KNOBS}
    space["block_policy"] = list(k.block_policy) if k.active_blocks is not None else ["prefix"]
    return space


def units_of(spec: SweepSpec, *, config: dict[str, Any], dataset_index: int) -> list[WorkUnit]:
    """The config's units for one dataset: the grid expansion of a one-config, one-dataset spec."""
    knobs = KnobGrid(**{name: ([config[name]] if config[name] is not None else None)
                        for name in INT_KNOBS},
                     block_policy=[config["block_policy"]])
    one = spec.model_copy(update={"knobs": knobs, "datasets": [spec.datasets[dataset_index]]})
    return expand(one)


def units_frame(store: RunStore, unit_ids: list[str]):
    """The stored rows of the given units as a DataFrame (empty when none is stored). Each part is
    checked against its checksum; a corrupt one is left out with a warning (its unit counts as not
    measured, and ``--resume`` moves it aside and runs it again)."""
    import pyarrow as pa

    from flexvlm_ray.store.schema import ROW_SCHEMA
    from flexvlm_ray.store.writer import CorruptPart

    tables = []
    for path in store.part_paths(unit_ids):
        try:
            tables.append(store.read_part(path.stem))
        except CorruptPart as exc:
            store.warn_corrupt(exc, moved=False)
    if not tables:
        return ROW_SCHEMA.empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def objectives(frame) -> Optional[dict[str, float]]:
    """P50 T_total (ms) and mean score of a config's ok rows (score 0 where unscored)."""
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return None
    score = ok["score"].mean() if ok["score"].notna().any() else 0.0
    return {"latency": float(ok["T_total"].median()), "quality": float(score)}


@dataclasses.dataclass
class _Search:
    dataset_index: int
    dataset: str
    searcher: Any
    space: dict[str, list]
    budget: int
    grid_size: int
    suggestions: int = 0
    measured: set = dataclasses.field(default_factory=set)   # config keys launched
    results: dict = dataclasses.field(default_factory=dict)  # config key -> objectives / None

    @property
    def open(self) -> bool:
        return (len(self.measured) < min(self.budget, self.grid_size)
                and self.suggestions < SUGGESTIONS_PER_SAMPLE * self.budget)


@dataclasses.dataclass
class _Trial:
    trial_id: str
    search: _Search
    config: dict[str, Any]
    unit_ids: list[str]
    new: bool


class TuneDriver(SweepDriver):
    """The grid driver's worker pool, fed by searchers instead of a fixed unit list."""

    def run_search(self, *, spec: SweepSpec) -> RunSummary:
        tune = spec.tune or TuneSpec()
        space = search_space(spec)
        grid_size = len(knob_grid(spec))
        self.searches = [_Search(dataset_index=i, dataset=ds.name, space=space, budget=tune.num_samples,
                                 grid_size=grid_size,
                                 searcher=make_searcher(space=space, searcher=tune.searcher, seed=tune.seed + i))
                         for i, ds in enumerate(spec.datasets)]
        self.spec, self.trials, self.log = spec, {}, []
        self.unit_index = len(self.store.manifest()["unit_ids"])
        self.summary = RunSummary(total=0, skipped=0)
        # the most units the search can queue per GPU type (workers = min(GPUs, units))
        most = sum(tune.num_samples * ds.shards for ds in spec.datasets) * spec.repeats
        stubs = [SimpleNamespace(gpu_type=t) for t in (spec.gpu_types or [None]) for _ in range(most)]
        begun = time.perf_counter()
        self._start_workers(self._make_slots(stubs, spec.gpu_types))
        self.summary.workers_start_s = time.perf_counter() - begun
        self.queues = {s.gpu_type: deque() for s in self.slots}
        self.by_ref = {}
        self.bar = progress_bar(total=0, enabled=self.progress)
        started = time.perf_counter()
        try:
            while True:
                self._suggest()
                for slot in self.slots:
                    self._fill(slot)
                if not self.by_ref:
                    if self.trials:  # every unit of the open trials was already stored
                        self._finish_trials()
                        continue
                    break
                self._wait_one()
                self._finish_trials()
        finally:
            self._end(started=started)
        return self.summary

    # -- searcher side -----------------------------------------------------------------
    def _suggest(self) -> None:
        """Open trials until one config per worker (+1) is in flight or every search is done."""
        limit = len(self.slots) + 1
        progressed = True
        while len(self.trials) < limit and progressed:
            progressed = False
            for search in self.searches:
                if len(self.trials) >= limit or not search.open:
                    continue
                progressed = True
                trial_id = f"{search.dataset}-{search.suggestions:04d}"
                search.suggestions += 1
                config = full_config(search.searcher.suggest(trial_id), search.space)
                key = config_key(config)
                if key in search.results:  # measured before: answer from the store
                    self._tell(search, trial_id, config, search.results[key], new=False)
                    continue
                if key in search.measured:  # in flight: wait for the same units
                    waiting = next(t for t in self.trials.values() if t.search is search
                                   and config_key(t.config) == key)
                    self.trials[trial_id] = _Trial(trial_id, search, config, waiting.unit_ids, new=False)
                    continue
                search.measured.add(key)
                units = units_of(self.spec, config=config, dataset_index=search.dataset_index)
                self._add_units(units)
                self.trials[trial_id] = _Trial(trial_id, search, config, [u.unit_id for u in units], new=True)

    def _add_units(self, units: list[WorkUnit]) -> None:
        """Record the units in the run folder (manifest, units.jsonl) and queue the unstored ones."""
        manifest = self.store.manifest()
        known = set(manifest["unit_ids"])
        fresh = []
        for unit in units:
            if unit.unit_id not in known:
                fresh.append(dataclasses.replace(unit, index=self.unit_index))
                self.unit_index += 1
        if fresh:
            lines = "".join(json.dumps(u.to_dict(), sort_keys=True) + "\n" for u in fresh)
            path = self.store.root / "units.jsonl"
            atomic_write_bytes(path, (path.read_text() + lines).encode())
            self.store.update_manifest(unit_ids=manifest["unit_ids"] + [u.unit_id for u in fresh])
        done = self.store.done_ids()
        pending = [u for u in units if u.unit_id not in done]
        self.summary.total += len(units)
        self.summary.skipped += len(units) - len(pending)
        self.bar.total = (self.bar.total or 0) + len(pending)
        for unit in pending:
            self.queues[unit.gpu_type].append(unit)

    def _finish_trials(self) -> None:
        """Report every trial whose units are all stored or failed."""
        done = self.store.done_ids()
        failed = set(self.store.failure_records())
        for trial_id, trial in list(self.trials.items()):
            if not all(u in done or u in failed for u in trial.unit_ids):
                continue
            result = objectives(units_frame(self.store, trial.unit_ids))
            key = config_key(trial.config)
            trial.search.results.setdefault(key, result)
            del self.trials[trial_id]
            self._tell(trial.search, trial_id, trial.config, trial.search.results[key], new=trial.new)

    def _tell(self, search: _Search, trial_id: str, config: dict[str, Any], result: Optional[dict],
              *, new: bool) -> None:
        if result is None:
            search.searcher.on_trial_complete(trial_id, result=None, error=True)
        else:
            search.searcher.on_trial_complete(trial_id, result=dict(result))
        self.log.append({"order": len(self.log), "trial": trial_id, "dataset": search.dataset,
                         "config": config, "new_config": new, **(result or {"latency": None, "quality": None})})
        atomic_write_json(self.store.root / "tune_trials.json", self.log)
