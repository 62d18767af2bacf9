"""The adaptive searcher behind ``search: tune`` (and E2's replay of it), as a public factory.

``make_searcher`` builds Ray Tune's ``OptunaSearch`` over the knobs that take more than one value,
with two objectives: latency (min) and quality (max). ``full_config`` completes a suggestion with the
knobs the grid fixes; ``config_key`` is a config's identity in ``KNOBS`` order. optuna and Ray are
imported only when a searcher is made.
"""
from __future__ import annotations

from typing import Any

from flexvlm_ray.knobs.base import KNOB_NAMES

KNOBS = KNOB_NAMES
METRICS = ["latency", "quality"]
MODES = ["min", "max"]
# optuna samplers a spec may name (tune.searcher)
SAMPLERS = ("tpe", "nsga2", "random")


def make_searcher(*, space: dict[str, list], searcher: str, seed: int):
    """Ray Tune's OptunaSearch over the knobs with more than one value, two objectives."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
                "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=8),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed)}
    assert tuple(samplers) == SAMPLERS
    free = {name: CategoricalDistribution(values) for name, values in space.items() if len(values) > 1}
    return OptunaSearch(space=free, metric=METRICS, mode=MODES, sampler=samplers[searcher]())


def full_config(params: dict[str, Any], space: dict[str, list]) -> dict[str, Any]:
    """The searcher's params plus the knobs fixed by the grid (one value), in KNOBS order."""
    config = {name: (params[name] if name in params else space[name][0]) for name in KNOBS}
    if config["active_blocks"] is None:
        config["block_policy"] = "prefix"
    return config


def config_key(config: dict[str, Any]) -> tuple:
    return tuple(config[name] for name in KNOBS)
