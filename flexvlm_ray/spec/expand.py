"""SweepSpec -> [WorkUnit]: knob grid x dataset shards x repeats x GPU types. Pure.

A unit's id is a hash of its canonical content (model, dataset shard, knobs, measurement
settings, repeat, GPU type, seed) and the row schema version, so the same unit gets the same
id in every expansion and in every order, and a schema change gives new ids.

A unit's ``model`` and ``measure`` are the spec's own validated, frozen ``ModelSpec`` and
``MeasureSpec``; ``to_dict`` writes them as plain dicts (units.jsonl, the dict a worker receives)
and ``from_dict`` validates them back.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from flexvlm_ray.models.base import Knobs
from flexvlm_ray.spec.schema import MeasureSpec, ModelSpec, SweepSpec, grid_values
from flexvlm_ray.store.schema import SCHEMA_VERSION

# What a unit written before these measure settings existed ran with: the old code read each one
# with dict.get, so a missing key meant off (None, or the 'pass' sync it defaulted to). A unit read
# back from such a units.jsonl gets these values, not the spec's defaults.
LEGACY_MEASURE: dict[str, Any] = {"gc_off": False, "pin_cpus": False, "cpu_threads": None, "sync": "pass",
                                  "check_gpu_idle": False, "target_ci": None, "max_runs": None, "burn_in_s": 0.0}


@dataclass(frozen=True)
class WorkUnit:
    unit_id: str
    index: int                     # position in the run order
    sweep: str
    experiment: str
    model: ModelSpec
    dataset: str
    split: str
    path: Optional[str]
    num_samples: Optional[int]
    shard: int
    num_shards: int
    knobs: Knobs
    repeat: int
    gpu_type: Optional[str]
    measure: MeasureSpec
    seed: int
    control: Optional[dict[str, Any]] = None   # closed-loop runs (spec.control): role, policy, budget fraction

    @property
    def config_key(self) -> tuple:
        """The knob configuration, shared by every shard and repeat of it."""
        return (self.knobs.max_crops, self.knobs.top_k, self.knobs.active_blocks,
                self.knobs.block_policy, self.knobs.max_new_tokens)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (units.jsonl, failure records, what a worker receives)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "model": self.model.model_dump(), "measure": self.measure.model_dump(),
                "knobs": asdict(self.knobs), "control": copy.deepcopy(self.control)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkUnit":
        """A unit of ``to_dict`` data, also as older code wrote it (no ``control`` key, measure settings
        that did not exist yet: ``LEGACY_MEASURE``); model and measure are validated (pydantic errors)."""
        return cls(**{**data, "knobs": Knobs(**data["knobs"]), "model": ModelSpec.model_validate(data["model"]),
                      "measure": MeasureSpec.model_validate({**LEGACY_MEASURE, **data["measure"]})})


def make_unit(*, index: int, sweep: str, experiment: str, model: ModelSpec, dataset: str, split: str,
              path: Optional[str], num_samples: Optional[int], shard: int, num_shards: int, knobs: Knobs,
              repeat: int, gpu_type: Optional[str], measure: MeasureSpec, seed: int,
              control: Optional[dict[str, Any]] = None) -> WorkUnit:
    """A unit with its id: the hash of its content (every field but index, sweep and experiment; control
    only where there is one), model and measure as their plain dicts."""
    content = dict(model=model.model_dump(), dataset=dataset, split=split, path=path, num_samples=num_samples,
                   shard=shard, num_shards=num_shards, knobs=asdict(knobs), repeat=repeat, gpu_type=gpu_type,
                   measure=measure.model_dump(), seed=seed)
    if control is not None:
        content["control"] = control
    return WorkUnit(unit_id=unit_id_of(content), index=index, sweep=sweep, experiment=experiment, model=model,
                    dataset=dataset, split=split, path=path, num_samples=num_samples, shard=shard,
                    num_shards=num_shards, knobs=knobs, repeat=repeat, gpu_type=gpu_type, measure=measure,
                    seed=seed, control=control)


def unit_id_of(content: dict[str, Any]) -> str:
    canonical = json.dumps({"schema_version": SCHEMA_VERSION, **content}, sort_keys=True,
                           separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def knob_grid(spec: SweepSpec) -> list[Knobs]:
    """Every knob combination, in a fixed order; block policy varies only with active_blocks."""
    k = spec.knobs
    combos = []
    for crops, top_k, blocks, new_tokens in itertools.product(
            grid_values(k.max_crops), grid_values(k.top_k), grid_values(k.active_blocks),
            grid_values(k.max_new_tokens)):
        policies = k.block_policy if blocks is not None else ["prefix"]
        for policy in policies:
            combos.append(Knobs(max_crops=crops, top_k=top_k, active_blocks=blocks,
                                block_policy=policy, max_new_tokens=new_tokens))
    return combos


def _none_first(value: Any) -> tuple:
    return (value is not None, value if value is not None else 0)


def shape_order(knobs: Knobs) -> tuple:
    """Sort key of ``order: shape``: active blocks and their policy, top_k and output length first (they key
    a worker's decode and prefill graphs), crop count last (it keys the vision graphs and the prompt
    length), so consecutive units on a worker replay the graphs the previous ones captured."""
    return (_none_first(knobs.active_blocks), knobs.block_policy, _none_first(knobs.top_k),
            _none_first(knobs.max_new_tokens), _none_first(knobs.max_crops))


def expand(spec: SweepSpec) -> list[WorkUnit]:
    if spec.control is not None:
        from flexvlm_ray.spec.closed_loop import expand_closed_loop

        return expand_closed_loop(spec)
    gpu_types: list[Optional[str]] = list(spec.gpu_types) if spec.gpu_types else [None]
    cells = []  # (config index, dataset index, shard, repeat, gpu type)
    for (ci, knobs), (di, ds), repeat, gpu_type in itertools.product(
            enumerate(knob_grid(spec)), enumerate(spec.datasets), range(spec.repeats), gpu_types):
        for shard in range(ds.shards):
            cells.append((ci, di, shard, repeat, gpu_type, knobs, ds))
    if spec.order == "interleave":
        # repeat-major, then shard, then config: consecutive units walk across configs
        cells.sort(key=lambda c: (c[3], c[1], c[2], gpu_types.index(c[4]), c[0]))
    elif spec.order == "shape":
        # repeat-major, then the knobs that key the decoder's graphs, then crops, dataset and shard
        cells.sort(key=lambda c: (c[3], gpu_types.index(c[4]), shape_order(c[5]), c[1], c[2], c[0]))
    return [make_unit(index=index, sweep=spec.name, experiment=spec.experiment, model=spec.model, dataset=ds.name,
                      split=ds.split, path=ds.path, num_samples=ds.num_samples, shard=shard, num_shards=ds.shards,
                      knobs=knobs, repeat=repeat, gpu_type=gpu_type, measure=spec.measure, seed=spec.seed)
            for index, (_, _, shard, repeat, gpu_type, knobs, ds) in enumerate(cells)]
