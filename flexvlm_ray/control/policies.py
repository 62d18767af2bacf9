"""Policies: per request and latency budget, which configuration of the space to run.

Every policy ranks the space for a request (``rank``: configuration indices, most preferred first);
``Controller.decide`` runs the first one, or, with the E3 guardrail, the first one the guardrail
admits (estimated T_total <= budget x margin; none admitted: the configuration with the lowest
estimate). Registered policies (``POLICIES``; ``fit_policy`` builds one from a ``RowEnvironment``):

  full         always the full configuration (no knob reduced)
  static       one configuration per workload (dataset) and budget: the best mean training quality
               among configurations whose training P95 latency fits the budget (none: the fastest P95)
  flops_proxy  the configuration with the most seed-formula FLOPs among those whose FLOPs x a fitted
               ms-per-FLOP constant fit the budget (none: the fewest FLOPs)
  random       uniform over the configurations the estimator says fit (none: the lowest estimate),
               seeded by the request id and budget, so a decision can be replayed
  lut          a table keyed by task type and image size class (crop count at the largest max_crops):
               the most accurate configuration of the cell whose measured P95 fits (cells with fewer
               than ``min_cell`` training requests fall back to the task, then to every request)
  learned      a small MLP (``learned.PolicyNet``) over the request's feature vector and the budget,
               trained on oracle labels (``RowEnvironment.oracle``) at budgets spread over each
               workload's training latencies; ranks by its logits

``rank`` is the reference semantics (``Controller.decide_reference``). ``Controller.decide`` runs each
policy's ``decider``: the same decision (tests/test_control.py compares them, and the decisions of the
committed controllers with those made before this path existed), made cheaply because the worker
times it (M3): nothing that does not depend on the request is computed per decision (tables sorted
once into Python lists, the estimator folded per task and image crop counts, estimates remembered
per (task, crop counts, prompt words), the network's forward as numpy matmuls of its exported
weights), the guardrail reads an estimate only for the candidates it passes, and no policy computes
what it does not read.
"""
from __future__ import annotations

import json
import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from flexvlm_ray.control.env import RowEnvironment
from flexvlm_ray.control.estimate import NO_SPREAD, CandidateModel, Guardrail, RequestTerms
from flexvlm_ray.control.features import Featurizer, Request, RequestFeatures
from flexvlm_ray.control.learned import PolicyNet, train_policy_net
from flexvlm_ray.control.space import ConfigSpace
from flexvlm_ray.models.base import Knobs
from flexvlm_ray.registry import Registry

FORMAT = "flexvlm-ray/controller/v1"
MEMO_BUDGETS = 256   # budgets a table remembers its first choice for (and request terms a controller keeps)
MEMO_ESTIMATES = 4096   # (task, crop counts, prompt words) whose estimates a controller keeps
NOT_COUNTED = -2     # Decision.admitted of the decision path with a guardrail: it stops at the first admitted
TRAIN_BUDGET_FRACTIONS = tuple(np.round(np.linspace(0.2, 1.3, 23), 3))  # learned: budgets per request, x full P50


@dataclass
class Context:
    """What a decision computes once per request: features and every configuration's estimate."""

    features: RequestFeatures
    estimates: np.ndarray          # estimated T_total (ms) per configuration
    budget_ms: float


Decide = Callable[[Request, float], "Decision"]


def _reader(controller: "Controller", kind: str) -> Callable[[Request], list[float]]:
    """request -> its estimated T_total (``kind`` 'latency'), the same x the spread ('guarded': what a
    calibrated guardrail compares) or the seed FLOPs ('flops') of every configuration,
    from the controller's memos: image size -> crop counts, prompt -> word count, (task, crop counts,
    words) -> the list (a miss computes and stores)."""
    featurizer = controller.featurizer
    sizes, size_info = featurizer._memo, featurizer.size_info
    prompts, prompt_stats = featurizer._prompts, featurizer.prompt_stats
    memo, compute = {"latency": (controller._estimates, controller.estimates_of),
                     "guarded": (controller._guarded, controller.guarded_estimates_of),
                     "flops": (controller._flops, controller.flops_of)}[kind]

    def read(request: Request) -> list[float]:
        size = sizes.get((request.width, request.height)) or size_info(request.width, request.height)
        stats = prompts.get(request.prompt) or prompt_stats(request.prompt)
        found = memo.get((request.task, size.counts, stats.words))
        return found if found is not None else compute(request.task, size.counts, stats.words)
    return read


def _argmin(values: list[float]) -> int:
    """The first index of the smallest value (np.argmin's choice)."""
    return min(range(len(values)), key=values.__getitem__)


class Policy(ABC):
    name = ""

    @abstractmethod
    def rank(self, ctx: Context) -> np.ndarray:
        """Configuration indices, most preferred first (every index once): the reference semantics."""

    def decider(self, controller: "Controller", guardrail: Optional[Guardrail]) -> Decide:
        """(request, budget ms) -> Decision: what ``Controller.decide_reference`` gives from ``rank``, made
        cheaply (the worker times it). Policies override it with a function that reads only what they
        need, everything request-independent bound in it; this default is the reference itself."""
        def decide(request: Request, budget_ms: float) -> Decision:
            ctx = controller.context(request, budget_ms)
            return controller.decision(*_reference_choice(self.rank(ctx), controller, ctx, guardrail))
        return decide

    def to_dict(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, space: ConfigSpace, model: CandidateModel,
                  featurizer: Featurizer) -> "Policy":
        return cls()


POLICIES: Registry[type[Policy]] = Registry("policy")


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def decorator(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        return POLICIES.register(name)(cls)
    return decorator


def fit_ranked(*, quality: np.ndarray, latency: np.ndarray, budget_ms: float) -> np.ndarray:
    """Fitting configurations by quality (desc, ties: lower latency), then the rest by latency (asc)."""
    return RankedTable(quality=quality, latency=latency).rank(budget_ms)


def _reference_choice(order: np.ndarray, controller: "Controller", ctx: Context,
                      guardrail: Optional[Guardrail]) -> tuple[int, int]:
    """The first of ``order``, or with the guardrail the first it admits (none: the lowest guarded estimate)."""
    if guardrail is None:
        return int(order[0]), -1
    guarded = controller.model.guarded(ctx.estimates, guardrail, task=ctx.features.request.task)
    mask = guardrail.admit(estimates=guarded, budget_ms=ctx.budget_ms)
    admitted = int(mask.sum())
    return (int(order[np.argmax(mask[order])]) if admitted else int(np.argmin(guarded))), admitted


def _table_decider(controller: "Controller", guardrail: Optional[Guardrail],
                   table_of: Callable[[Request], "RankedTable"]) -> Decide:
    """A table policy's decision: the first of the table's rank, or the first the guardrail admits."""
    plain, counted, nothing = (controller.decisions(a) for a in (-1, NOT_COUNTED, 0))
    if guardrail is None:
        def decide(request: Request, budget_ms: float) -> Decision:
            table = table_of(request)
            index = table._first.get(budget_ms)
            return plain[index if index is not None else table.first(budget_ms)]
        return decide
    estimates_of, limit_of = controller.guard_reader(guardrail), guardrail.limit

    def decide_guarded(request: Request, budget_ms: float) -> Decision:
        table, estimates, limit = table_of(request), estimates_of(request), limit_of(budget_ms)
        for c, latency in table.best_pairs:         # rank's order, reading the estimates it passes only
            if latency <= budget_ms and estimates[c] <= limit:
                return counted[c]
        for c, latency in table.fast_pairs:
            if latency > budget_ms and estimates[c] <= limit:
                return counted[c]
        if any(e <= limit for e in estimates):     # admitted ones that rank leaves out (NaN table latencies)
            return counted[table.first(budget_ms)]
        return nothing[_argmin(estimates)]
    return decide_guarded


class RankedTable:
    """One table's two budget-independent orders, sorted once: a decision only masks them."""

    def __init__(self, *, quality: np.ndarray, latency: np.ndarray) -> None:
        quality, latency = np.asarray(quality, float), np.asarray(latency, float)
        self.best = np.lexsort((latency, -quality))
        self.best_latency = latency[self.best]
        self.fast = np.argsort(latency, kind="stable")
        self.fast_latency = latency[self.fast]

        # the decision path walks the same two orders as Python lists
        self.best_pairs = list(zip(self.best.tolist(), self.best_latency.tolist()))
        self.fast_pairs = list(zip(self.fast.tolist(), self.fast_latency.tolist()))
        self._first: dict[float, int] = {}

    def rank(self, budget_ms: float) -> np.ndarray:
        return np.concatenate([self.best[self.best_latency <= budget_ms], self.fast[self.fast_latency > budget_ms]])

    def first(self, budget_ms: float) -> int:
        """``rank(budget_ms)[0]``, remembered per budget."""
        index = self._first.get(budget_ms)
        if index is None:
            if len(self._first) >= MEMO_BUDGETS:
                self._first.clear()
            index = self._first[budget_ms] = int(self.rank(budget_ms)[0])
        return index


def _pooled_latency(cells: dict[str, dict[str, Any]], groups: dict[str, list[int]], *, env: RowEnvironment,
                    quantile: float) -> dict[str, dict[str, Any]]:
    """Each size cell's latency as its median x the task's spread of latency over the cell medians."""
    by_task: dict[str, list[str]] = {}
    for key in groups:
        if key != "*" and not key.endswith("/*"):
            by_task.setdefault(key.split("/")[0], []).append(key)
    for task, keys in by_task.items():
        medians = {key: np.median(env.latency[groups[key]], axis=0) for key in keys}
        ratios = np.concatenate([env.latency[groups[key]] / medians[key] for key in keys])
        spread = np.quantile(ratios, quantile, axis=0)
        for key in keys:
            cells[key] = {**cells[key], "latency": (medians[key] * spread).tolist()}
    return cells


def _table(quality: np.ndarray, latency: np.ndarray, q: float) -> dict[str, list[float]]:
    return {"quality": quality.mean(axis=0).tolist(), "latency": np.quantile(latency, q, axis=0).tolist(),
            "n": int(len(quality))}


@register_policy("full")
class FullPolicy(Policy):
    def __init__(self, *, full_index: int = 0) -> None:
        self.full_index = full_index

    def rank(self, ctx: Context) -> np.ndarray:
        order = np.arange(len(ctx.estimates))
        return np.concatenate([[self.full_index], order[order != self.full_index]])

    def decider(self, controller: "Controller", guardrail: Optional[Guardrail]) -> Decide:
        decision = controller.decisions(-1)[self.full_index]     # full runs no guardrail: nothing to compute
        return lambda request, budget_ms: decision

    @classmethod
    def fit(cls, *, env: RowEnvironment, **_: Any) -> "FullPolicy":
        return cls(full_index=env.space.full_index)

    def to_dict(self) -> dict[str, Any]:
        return {"full_index": self.full_index}

    @classmethod
    def from_dict(cls, data, **_):
        return cls(full_index=int(data["full_index"]))


@register_policy("static")
class StaticPolicy(Policy):
    """Per workload: mean quality and latency quantile of every configuration on training rows."""

    def __init__(self, *, tables: dict[str, dict[str, list[float]]]) -> None:
        self.tables = tables
        self.ranked = {key: RankedTable(quality=t["quality"], latency=t["latency"]) for key, t in tables.items()}

    @classmethod
    def fit(cls, *, env: RowEnvironment, quantile: float = 0.95, **_: Any) -> "StaticPolicy":
        tables = {ds: _table(env.quality[env.datasets == ds], env.latency[env.datasets == ds], quantile)
                  for ds in sorted(set(env.datasets))}
        tables["*"] = _table(env.quality, env.latency, quantile)
        return cls(tables=tables)

    def rank(self, ctx: Context) -> np.ndarray:
        return self.ranked.get(ctx.features.request.dataset, self.ranked["*"]).rank(ctx.budget_ms)

    def decider(self, controller: "Controller", guardrail: Optional[Guardrail]) -> Decide:
        ranked, every = self.ranked, self.ranked["*"]
        return _table_decider(controller, guardrail, lambda request: ranked.get(request.dataset, every))

    def to_dict(self) -> dict[str, Any]:
        return {"tables": self.tables}

    @classmethod
    def from_dict(cls, data, **_):
        return cls(tables=data["tables"])


@register_policy("flops_proxy")
class FlopsProxyPolicy(Policy):
    def __init__(self, *, model: CandidateModel) -> None:
        if model.flops is None:
            raise ValueError("policy flops_proxy needs training rows with the seeds' FLOPs (flops_* columns)")
        self.model = model

    @classmethod
    def fit(cls, *, model: CandidateModel, **_: Any) -> "FlopsProxyPolicy":
        return cls(model=model)

    def rank(self, ctx: Context) -> np.ndarray:
        flops = self.model.seed_flops(ctx.features)
        ms = flops * self.model.flops["ms_per_flop"]
        fits = ms <= ctx.budget_ms
        size = np.arange(len(flops))[::-1]          # equal FLOPs: the later (larger) grid configuration first
        big = np.lexsort((size, -flops))
        small = np.lexsort((-size, flops))
        return np.concatenate([big[fits[big]], small[~fits[small]]])

    def decider(self, controller: "Controller", guardrail: Optional[Guardrail]) -> Decide:
        plain, counted, nothing = (controller.decisions(a) for a in (-1, NOT_COUNTED, 0))
        flops_of, ms_per_flop = _reader(controller, "flops"), self.model.flops["ms_per_flop"]
        if guardrail is None:
            def decide(request: Request, budget_ms: float) -> Decision:
                flops, most = flops_of(request), None
                for c, f in enumerate(flops):      # the most FLOPs that fit (ties: the later configuration)
                    if f * ms_per_flop <= budget_ms and (most is None or f >= flops[most]):
                        most = c
                return plain[_argmin(flops) if most is None else most]
            return decide
        estimates_of, limit_of = controller.guard_reader(guardrail), guardrail.limit

        def decide_guarded(request: Request, budget_ms: float) -> Decision:
            flops, estimates, limit = flops_of(request), estimates_of(request), limit_of(budget_ms)
            most = least = None
            for c, f in enumerate(flops):
                if estimates[c] <= limit:
                    if f * ms_per_flop <= budget_ms:
                        if most is None or f >= flops[most]:
                            most = c
                    elif least is None or f < flops[least]:   # admitted, over budget: the fewest FLOPs (ties: earlier)
                        least = c
            if most is not None:
                return counted[most]
            return counted[least] if least is not None else nothing[_argmin(estimates)]
        return decide_guarded

    @classmethod
    def from_dict(cls, data, *, model, **_):
        return cls(model=model)


_DIGITS: list[bytes] = []


def _digits(c: int) -> bytes:
    """str(c).encode(), remembered."""
    while len(_DIGITS) <= c:
        _DIGITS.append(str(len(_DIGITS)).encode())
    return _DIGITS[c]


@register_policy("random")
class RandomPolicy(Policy):
    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    @classmethod
    def fit(cls, *, seed: int = 0, **_: Any) -> "RandomPolicy":
        return cls(seed=seed)

    def rank(self, ctx: Context) -> np.ndarray:
        # a uniform permutation of the fitting configs: sorted by a hash of (seed, request, budget, config)
        key = f"{self.seed}/{ctx.features.request.dataset}/{ctx.features.request.request_id}/{ctx.budget_ms:.6f}/"
        fits = ctx.estimates <= ctx.budget_ms
        shuffled = sorted(np.flatnonzero(fits).tolist(), key=lambda c: zlib.crc32(f"{key}{c}".encode()))
        rest = [c for c in np.argsort(ctx.estimates, kind="stable").tolist() if not fits[c]]
        return np.asarray(shuffled + rest, dtype=int)

    def decider(self, controller: "Controller", guardrail: Optional[Guardrail]) -> Decide:
        plain, counted, nothing = (controller.decisions(a) for a in (-1, NOT_COUNTED, 0))
        estimates_of, seed, crc32 = _reader(controller, "latency"), self.seed, zlib.crc32
        limit_of = None if guardrail is None else guardrail.limit
        guarded_of = None if guardrail is None else controller.guard_reader(guardrail)
        budgets: dict[float, str] = {}      # budget -> its '%.6f/' text

        def decide(request: Request, budget_ms: float) -> Decision:
            estimates = estimates_of(request)
            if limit_of is None:
                candidates = [c for c, e in enumerate(estimates) if e <= budget_ms]    # fit
            else:
                guarded, limit = guarded_of(request), limit_of(budget_ms)
                candidates = [c for c, e in enumerate(estimates) if e <= budget_ms and guarded[c] <= limit]
            made = plain if limit_of is None else counted
            if candidates:   # the lowest hash of (seed, request, budget, config), as rank's sort (ties: the
                text = budgets.get(budget_ms)      # earlier config); crc32 runs on the shared prefix once
                if text is None:
                    if len(budgets) >= MEMO_BUDGETS:
                        budgets.clear()
                    text = budgets[budget_ms] = f"{budget_ms:.6f}/"
                prefix = crc32(f"{seed}/{request.dataset}/{request.request_id}/{text}".encode())
                return made[min(candidates, key=lambda c: crc32(_digits(c), prefix))]
            if limit_of is None:
                return plain[_argmin(estimates)]
            admitted = [c for c, g in enumerate(guarded) if g <= limit]    # admitted, over budget: the lowest estimate
            return counted[min(admitted, key=estimates.__getitem__)] if admitted else nothing[_argmin(guarded)]
        return decide

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @classmethod
    def from_dict(cls, data, **_):
        return cls(seed=int(data["seed"]))


@register_policy("lut")
class LookupTablePolicy(Policy):
    def __init__(self, *, cells: dict[str, dict[str, list[float]]], featurizer: Featurizer) -> None:
        self.cells, self.featurizer = cells, featurizer
        self.ranked = {key: RankedTable(quality=t["quality"], latency=t["latency"]) for key, t in cells.items()}
        self.by_cell: dict[tuple[str, int], RankedTable] = {}    # (task, size class) -> its table, fallbacks resolved

    @staticmethod
    def cell_keys(features: RequestFeatures, featurizer: Featurizer) -> list[str]:
        task = features.request.task
        return [f"{task}/{featurizer.size_class(features)}", f"{task}/*", "*"]

    @classmethod
    def fit(cls, *, env: RowEnvironment, featurizer: Featurizer, quantile: float = 0.95, min_cell: int = 5,
            prior: float = 0.0, pooled_spread: bool = False, **_: Any) -> "LookupTablePolicy":
        """Cells of at least ``min_cell`` training requests. ``prior``: a cell's quality is its mean shrunk
        towards its parent's (the task's, then every request's) as if ``prior`` parent requests were added,
        so a cell of few requests does not pick a configuration on their noise. ``pooled_spread``: a cell's
        latency quantile is its median x the configuration's spread (the ``quantile`` of each request's
        latency over its cell's median, pooled over the cells of the task), so the quantile of a cell of few
        requests is not set by one noisy measurement; else the cell's own quantile."""
        groups: dict[str, list[int]] = {}
        for i, f in enumerate(env.requests):
            for key in cls.cell_keys(f, featurizer):
                groups.setdefault(key, []).append(i)
        kept = {key: idx for key, idx in groups.items() if len(idx) >= min_cell or key == "*"}
        cells = {key: _table(env.quality[idx], env.latency[idx], quantile) for key, idx in kept.items()}
        if pooled_spread:
            cells = _pooled_latency(cells, kept, env=env, quantile=quantile)
        if prior > 0:        # from the unshrunk means: a size cell towards its task's, a task's towards all
            means = {key: cell["quality"] for key, cell in cells.items()}
            for key, cell in cells.items():
                if key != "*":
                    task_key = f"{key.split('/')[0]}/*"
                    parent = means[task_key] if key != task_key and task_key in means else means["*"]
                    n = cell["n"]
                    cell["quality"] = [(n * q + prior * p) / (n + prior) for q, p in zip(cell["quality"], parent)]
        return cls(cells=cells, featurizer=featurizer)

    def rank(self, ctx: Context) -> np.ndarray:
        key = next(k for k in self.cell_keys(ctx.features, self.featurizer) if k in self.ranked)
        return self.ranked[key].rank(ctx.budget_ms)

    def decider(self, controller: "Controller", guardrail: Optional[Guardrail]) -> Decide:
        featurizer = controller.featurizer
        sizes, size_info, by_cell = featurizer._memo, featurizer.size_info, self.by_cell

        def table_of(request: Request) -> RankedTable:
            size = sizes.get((request.width, request.height)) or size_info(request.width, request.height)
            table = by_cell.get((request.task, size.size_class))
            return table if table is not None else self.table(request.task, size.size_class)
        return _table_decider(controller, guardrail, table_of)

    def table(self, task: str, size_class: int) -> RankedTable:
        """The table of a (task, size class) cell, its fallbacks resolved (remembered in ``by_cell``)."""
        if len(self.by_cell) >= MEMO_BUDGETS:
            self.by_cell.clear()
        key = next(k for k in (f"{task}/{size_class}", f"{task}/*", "*") if k in self.ranked)
        table = self.by_cell[(task, size_class)] = self.ranked[key]
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"cells": self.cells}

    @classmethod
    def from_dict(cls, data, *, featurizer, **_):
        return cls(cells=data["cells"], featurizer=featurizer)


@register_policy("learned")
class LearnedPolicy(Policy):
    def __init__(self, *, net: PolicyNet, featurizer: Featurizer, full_index: int,
                 info: Optional[dict[str, Any]] = None) -> None:
        self.net, self.featurizer, self.full_index, self.info = net, featurizer, full_index, info or {}
        self.forward = net.numpy_forward()

    def schema(self) -> dict[str, Any]:
        return {"features": self.featurizer.vector_names(), "featurizer": self.featurizer.to_dict(),
                "full_index": self.full_index, "info": self.info}

    @classmethod
    def fit(cls, *, env: RowEnvironment, model: CandidateModel, featurizer: Featurizer, seed: int = 0,
            hidden: int = 64, epochs: int = 300, **_: Any) -> "LearnedPolicy":
        full = env.space.full_index
        x, y = [], []
        p50 = {ds: env.full_p50(dataset=ds) for ds in sorted(set(env.datasets))}
        for i, features in enumerate(env.requests):
            full_estimate = float(model.latency(features)[full])
            for fraction in TRAIN_BUDGET_FRACTIONS:
                budget = fraction * p50[features.request.dataset]
                x.append(featurizer.vector(features, budget_ms=budget, full_estimate_ms=full_estimate))
                y.append(env.oracle(request=i, budget_ms=budget))
        net, info = train_policy_net(x=np.asarray(x), y=np.asarray(y), num_configs=len(env.space), hidden=hidden,
                                     epochs=epochs, seed=seed)
        return cls(net=net, featurizer=featurizer, full_index=full, info=info)

    def rank(self, ctx: Context) -> np.ndarray:
        x = self.featurizer.vector(ctx.features, budget_ms=ctx.budget_ms,
                                   full_estimate_ms=float(ctx.estimates[self.full_index]))
        return np.argsort(-self.forward(x), kind="stable")

    def decider(self, controller: "Controller", guardrail: Optional[Guardrail]) -> Decide:
        plain, counted, nothing = (controller.decisions(a) for a in (-1, NOT_COUNTED, 0))
        featurizer, forward, full, log = self.featurizer, self.forward, self.full_index, math.log
        sizes, size_info = featurizer._memo, featurizer.size_info
        prompts, prompt_stats, task_vector = featurizer._prompts, featurizer.prompt_stats, featurizer.task_vector
        memo, estimates_of = controller._estimates, controller.estimates_of
        limit_of = None if guardrail is None else guardrail.limit
        guarded_of = None if guardrail is None or not guardrail.calibrated else controller.guard_reader(guardrail)

        def decide(request: Request, budget_ms: float) -> Decision:
            size = sizes.get((request.width, request.height)) or size_info(request.width, request.height)
            stats = prompts.get(request.prompt) or prompt_stats(request.prompt)
            estimates = memo.get((request.task, size.counts, stats.words))
            if estimates is None:
                estimates = estimates_of(request.task, size.counts, stats.words)
            budget = budget_ms if budget_ms > 1e-3 else 1e-3
            full_estimate = estimates[full] if estimates[full] > 1e-3 else 1e-3
            # Featurizer.vector's entries, in its order, from the memoized parts
            logits = forward([log(budget), log(budget / full_estimate)] + stats.log1p_words + size.vector
                             + task_vector(request.task) + stats.bow).tolist()
            if limit_of is None:
                return plain[max(range(len(logits)), key=logits.__getitem__)]     # the first of the largest
            guarded = estimates if guarded_of is None else guarded_of(request)
            limit, best = limit_of(budget_ms), None
            for c, e in enumerate(guarded):
                if e <= limit and (best is None or logits[c] > logits[best]):
                    best = c
            return counted[best] if best is not None else nothing[_argmin(guarded)]
        return decide

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.net.to_bytes(schema=self.schema())}

    @classmethod
    def from_dict(cls, data, *, featurizer, **_):
        net, schema = PolicyNet.from_bytes(data["weights"])
        if schema["features"] != featurizer.vector_names():
            raise ValueError("the learned policy's feature schema does not match the controller's featurizer")
        return cls(net=net, featurizer=featurizer, full_index=int(schema["full_index"]), info=schema.get("info"))


def policy_label(name: str, guardrail: bool) -> str:
    """How rows and analyses name a policy: 'lut', or 'lut+guard' with the guardrail."""
    return f"{name}+guard" if guardrail else name


@dataclass(frozen=True)
class Decision:
    knobs: Knobs
    index: int
    admitted: int = -1     # configurations the guardrail admitted (-1: no guardrail; NOT_COUNTED: the decision
                           # path stops at the first it admits; decide_reference counts them)


@dataclass
class Controller:
    """Everything a worker needs to decide: the space, the featurizer, the fitted estimates and the
    fitted policies. ``decide`` is the per-request call; ``bind`` gives the issue's
    ``decide(request, budget_ms) -> Knobs`` for one policy."""

    space: ConfigSpace
    featurizer: Featurizer
    model: CandidateModel
    policies: dict[str, Policy]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = list(self.featurizer.max_crops_values)
        self._crop_slot = np.array([values.index(k.max_crops) for k in self.space.configs])
        self._terms: dict[tuple[str, tuple[int, ...]], RequestTerms] = {}
        self._estimates: dict[tuple[str, tuple[int, ...], int], list[float]] = {}
        self._flops: dict[tuple[str, tuple[int, ...], int], list[float]] = {}
        self._guarded: dict[tuple[str, tuple[int, ...], int], list[float]] = {}
        # the decision path's answers, made once: [admitted][index] for admitted -1, NOT_COUNTED and 0
        self._decisions = {a: [Decision(knobs=k, index=i, admitted=a) for i, k in enumerate(self.space.configs)]
                           for a in (-1, NOT_COUNTED, 0)}
        self._deciders: dict[tuple[str, Optional[Guardrail]], Decide] = {}

    def context(self, request: Request, budget_ms: float) -> Context:
        features = self.featurizer.features(request)
        return Context(features=features, estimates=self.model.latency(features), budget_ms=float(budget_ms))

    def terms(self, task: str, counts: tuple[int, ...]) -> RequestTerms:
        """``CandidateModel.terms`` for a task and an image's crop counts (``Featurizer.crop_counts``),
        remembered: few tasks and crop-count tuples recur."""
        key = (task, counts)
        terms = self._terms.get(key)
        if terms is None:
            if len(self._terms) >= MEMO_BUDGETS:
                self._terms.clear()
            terms = self._terms[key] = self.model.terms(task, np.asarray(counts, float)[self._crop_slot])
        return terms

    def estimates_of(self, task: str, counts: tuple[int, ...], prompt_words: int) -> list[float]:
        """Estimated T_total of every configuration for a task, an image's crop counts and a prompt's
        word count (all an estimate depends on), remembered."""
        key = (task, counts, prompt_words)
        estimates = self._estimates.get(key)
        if estimates is None:
            if len(self._estimates) >= MEMO_ESTIMATES:
                self._estimates.clear()
            estimates = self._estimates[key] = self.terms(task, counts).latency(
                self.model.language_tokens_of(prompt_words))
        return estimates

    def guarded_estimates_of(self, task: str, counts: tuple[int, ...], prompt_words: int) -> list[float]:
        """``estimates_of`` x each configuration's spread (what a calibrated guardrail compares), remembered."""
        key = (task, counts, prompt_words)
        guarded = self._guarded.get(key)
        if guarded is None:
            if len(self._guarded) >= MEMO_ESTIMATES:
                self._guarded.clear()
            guarded = self._guarded[key] = [e * s for e, s in zip(self.estimates_of(task, counts, prompt_words),
                                                                  self.model.spread_of(task))]
        return guarded

    def guard_reader(self, guardrail: Guardrail) -> Callable[[Request], list[float]]:
        """request -> what ``guardrail`` compares with budget x margin, per configuration."""
        if guardrail.calibrated and self.model.spread is None:
            raise ValueError(NO_SPREAD)
        return _reader(self, "guarded" if guardrail.calibrated else "latency")

    def flops_of(self, task: str, counts: tuple[int, ...], prompt_words: int) -> list[float]:
        """The seeds' FLOPs of every configuration (as ``estimates_of``), remembered."""
        key = (task, counts, prompt_words)
        flops = self._flops.get(key)
        if flops is None:
            if len(self._flops) >= MEMO_ESTIMATES:
                self._flops.clear()
            flops = self._flops[key] = self.terms(task, counts).flops(self.model.language_tokens_of(prompt_words))
        return flops

    def decisions(self, admitted: int) -> list[Decision]:
        """The Decision of every configuration with ``admitted`` (-1, NOT_COUNTED or 0), made once."""
        return self._decisions[admitted]

    def decision(self, index: int, admitted: int) -> Decision:
        made = self._decisions.get(admitted)
        return made[index] if made is not None else Decision(knobs=self.space.configs[index], index=index,
                                                             admitted=admitted)

    def decider(self, policy: str, guardrail: Optional[Guardrail] = None) -> Decide:
        """(request, budget ms) -> Decision for one policy (and guardrail): the function a worker calls per
        request, made once (``Policy.decider``). The same decisions as ``decide_reference``."""
        fn = self._deciders.get((policy, guardrail))
        if fn is None:
            chosen = self.policies.get(policy)
            if chosen is None:
                raise KeyError(f"policy {policy!r} is not fitted in this controller; fitted: "
                               f"{', '.join(sorted(self.policies))}")
            fn = self._deciders[(policy, guardrail)] = chosen.decider(self, None if policy == "full" else guardrail)
        return fn

    def decide(self, request: Request, budget_ms: float, *, policy: str,
               guardrail: Optional[Guardrail] = None) -> Decision:
        """The per-request call: ``decider(policy, guardrail)(request, budget_ms)``. Each policy's decider
        reads only what it needs, from memoized request-independent parts; ``decide_reference`` is the
        same decision the slow way (every feature and estimate, then the policy's full ranking)."""
        return self.decider(policy, guardrail)(request, float(budget_ms))

    def decide_reference(self, request: Request, budget_ms: float, *, policy: str,
                         guardrail: Optional[Guardrail] = None) -> Decision:
        if policy not in self.policies:
            raise KeyError(f"policy {policy!r} is not fitted in this controller; fitted: {', '.join(sorted(self.policies))}")
        ctx = self.context(request, budget_ms)
        order = self.policies[policy].rank(ctx)
        return self.decision(*_reference_choice(order, self, ctx, None if policy == "full" else guardrail))

    def bind(self, policy: str, *, guardrail: Optional[Guardrail] = None) -> "BoundPolicy":
        return BoundPolicy(controller=self, policy=policy, guardrail=guardrail)

    # -- fit ----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, *, env: RowEnvironment, model: CandidateModel, featurizer: Featurizer, policies: list[str],
            seed: int = 0, options: Optional[dict[str, dict[str, Any]]] = None) -> "Controller":
        fitted = {}
        for name in policies:
            kind = POLICIES.get(name)
            fitted[name] = kind.fit(env=env, model=model, featurizer=featurizer, seed=seed,
                                    **(options or {}).get(name, {}))
        meta = {"training_requests": len(env), "configs": len(env.space),
                "learned": fitted["learned"].info if "learned" in fitted else None}
        return cls(space=env.space, featurizer=featurizer, model=model, policies=fitted, meta=meta)

    # -- save / load --------------------------------------------------------------------------
    def to_payload(self) -> dict[str, Any]:
        """Plain data (JSON-able except the learned weights, bytes): what workers receive."""
        return {"format": FORMAT, "space": self.space.to_list(), "featurizer": self.featurizer.to_dict(),
                "model": self.model.to_dict(), "meta": self.meta,
                "policies": {name: p.to_dict() for name, p in self.policies.items()}}

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> "Controller":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a controller (format {data.get('format')!r}, expected {FORMAT!r})")
        space = ConfigSpace.from_list(data["space"])
        featurizer = Featurizer.from_dict(data["featurizer"])
        model = CandidateModel.from_dict(data["model"], space=space)
        policies = {name: POLICIES.get(name).from_dict(d, space=space, model=model, featurizer=featurizer)
                    for name, d in data["policies"].items()}
        return cls(space=space, featurizer=featurizer, model=model, policies=policies, meta=data.get("meta", {}))

    def save(self, folder: str | Path) -> Path:
        """controller.json, and learned.pt (state dict + feature schema) when the learned policy is fitted."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = self.to_payload()
        learned = payload["policies"].get("learned")
        if learned is not None:
            (folder / "learned.pt").write_bytes(learned["weights"])
            payload["policies"]["learned"] = {"weights_file": "learned.pt"}
        (folder / "controller.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Controller":
        folder = Path(folder)
        payload = json.loads((folder / "controller.json").read_text())
        learned = payload["policies"].get("learned")
        if learned is not None:
            payload["policies"]["learned"] = {"weights": (folder / learned["weights_file"]).read_bytes()}
        return cls.from_payload(payload)


@dataclass
class BoundPolicy:
    controller: Controller
    policy: str
    guardrail: Optional[Guardrail] = None

    def decide(self, request: Request, budget_ms: float) -> Knobs:
        return self.controller.decider(self.policy, self.guardrail)(request, float(budget_ms)).knobs
