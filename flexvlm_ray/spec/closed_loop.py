"""Work units of a closed-loop (E4) run, ``spec.control``. Pure, like ``expand``.

Three roles, all known from the spec alone (so a run can be resumed):

  train      the knob grid over ``control.train_samples`` requests of each dataset's
             ``control.train_split`` (one unit per config and dataset): the policies' training rows
  reference  the full configuration (the grid's largest) on the held-out requests (each dataset's
             own split, num_samples and shards, x repeats): the ``full`` policy's rows and the
             reference P50 that budgets are fractions of
  control    every policy of ``control.policies`` x budget fraction x held-out shard x repeat, in
             that order (the policies of one budget side by side in time); the unit's knobs are the
             full configuration, the policy picks per request (``full`` listed here is measured at
             every budget, interleaved with the others; not listed, the analysis reads the reference rows)

The unit content hashes the role, policy, guardrail, budget fraction and the control settings.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional

from flexvlm_ray.models.base import Knobs
from flexvlm_ray.spec.expand import WorkUnit, knob_grid, make_unit
from flexvlm_ray.spec.schema import SweepSpec


def full_knobs(configs: list[Knobs]) -> Knobs:
    """The grid's largest configuration (most blocks, experts, crops, tokens; prefix first)."""
    def size(v: Optional[int]) -> float:
        return float("inf") if v is None else float(v)
    return max(configs, key=lambda k: (size(k.active_blocks), size(k.top_k), size(k.max_crops), k.max_new_tokens,
                                       k.block_policy == "prefix"))


def expand_closed_loop(spec: SweepSpec) -> list[WorkUnit]:
    control = spec.control
    settings = control.model_dump(mode="json")
    configs = knob_grid(spec)
    full = full_knobs(configs)
    gpu_types: list[Optional[str]] = list(spec.gpu_types) if spec.gpu_types else [None]
    cells: list[dict[str, Any]] = []
    for ds in spec.datasets:
        for knobs in configs:
            for gpu_type in gpu_types:
                cells.append(dict(dataset=ds, split=control.train_split, num_samples=control.train_samples, shard=0,
                                  num_shards=1, knobs=knobs, repeat=0, gpu_type=gpu_type, control={"role": "train"}))
    held_out = [(ds, shard, repeat, gpu_type) for ds in spec.datasets for repeat in range(spec.repeats)
                for gpu_type in gpu_types for shard in range(ds.shards)]
    for ds, shard, repeat, gpu_type in held_out:
        cells.append(dict(dataset=ds, split=ds.split, num_samples=ds.num_samples, shard=shard, num_shards=ds.shards,
                          knobs=full, repeat=repeat, gpu_type=gpu_type, control={"role": "reference", "policy": "full"}))
    # budget-major, policy-minor: the policies of one budget run side by side in time, so a host whose
    # speed drifts during the run does not favour the policies that happen to run first
    for fraction in control.budgets:
        for (ds, shard, repeat, gpu_type), policy in itertools.product(held_out, control.policies):
            cells.append(dict(dataset=ds, split=ds.split, num_samples=ds.num_samples, shard=shard,
                              num_shards=ds.shards, knobs=full, repeat=repeat, gpu_type=gpu_type,
                              control={"role": "control", "policy": policy.name, "guardrail": policy.guardrail,
                                       "margin": control.margin, "calibrated": control.guard_quantile is not None,
                                       "budget_fraction": float(fraction)}))
    units = []
    for index, c in enumerate(cells):
        ds = c["dataset"]
        unit_control = {**c["control"], "settings": settings} if c["control"]["role"] == "control" else c["control"]
        units.append(make_unit(index=index, sweep=spec.name, experiment=spec.experiment, model=spec.model,
                               dataset=ds.name, split=c["split"], path=ds.path, num_samples=c["num_samples"],
                               shard=c["shard"], num_shards=c["num_shards"], knobs=c["knobs"], repeat=c["repeat"],
                               gpu_type=c["gpu_type"], measure=spec.measure, seed=spec.seed, control=unit_control))
    return units
