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
"""
from __future__ import annotations

import json
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from flexvlm_ray.control.env import RowEnvironment
from flexvlm_ray.control.estimate import CandidateModel, Guardrail
from flexvlm_ray.control.features import Featurizer, Request, RequestFeatures
from flexvlm_ray.control.learned import PolicyNet, train_policy_net
from flexvlm_ray.control.space import ConfigSpace
from flexvlm_ray.models.base import Knobs
from flexvlm_ray.registry import Registry

FORMAT = "flexvlm-ray/controller/v1"
TRAIN_BUDGET_FRACTIONS = tuple(np.round(np.linspace(0.2, 1.3, 23), 3))  # learned: budgets per request, x full P50


@dataclass
class Context:
    """What a decision computes once per request: features and every configuration's estimate."""

    features: RequestFeatures
    estimates: np.ndarray          # estimated T_total (ms) per configuration
    budget_ms: float


class Policy(ABC):
    name = ""

    @abstractmethod
    def rank(self, ctx: Context) -> np.ndarray:
        """Configuration indices, most preferred first (every index once)."""

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


class RankedTable:
    """One table's two budget-independent orders, sorted once: a decision only masks them."""

    def __init__(self, *, quality: np.ndarray, latency: np.ndarray) -> None:
        quality, latency = np.asarray(quality, float), np.asarray(latency, float)
        self.best = np.lexsort((latency, -quality))
        self.best_latency = latency[self.best]
        self.fast = np.argsort(latency, kind="stable")
        self.fast_latency = latency[self.fast]

    def rank(self, budget_ms: float) -> np.ndarray:
        return np.concatenate([self.best[self.best_latency <= budget_ms], self.fast[self.fast_latency > budget_ms]])


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

    @classmethod
    def from_dict(cls, data, *, model, **_):
        return cls(model=model)


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

    @staticmethod
    def cell_keys(features: RequestFeatures, featurizer: Featurizer) -> list[str]:
        task = features.request.task
        return [f"{task}/{featurizer.size_class(features)}", f"{task}/*", "*"]

    @classmethod
    def fit(cls, *, env: RowEnvironment, featurizer: Featurizer, quantile: float = 0.95, min_cell: int = 5,
            **_: Any) -> "LookupTablePolicy":
        groups: dict[str, list[int]] = {}
        for i, f in enumerate(env.requests):
            for key in cls.cell_keys(f, featurizer):
                groups.setdefault(key, []).append(i)
        cells = {key: _table(env.quality[idx], env.latency[idx], quantile)
                 for key, idx in groups.items() if len(idx) >= min_cell or key == "*"}
        return cls(cells=cells, featurizer=featurizer)

    def rank(self, ctx: Context) -> np.ndarray:
        key = next(k for k in self.cell_keys(ctx.features, self.featurizer) if k in self.ranked)
        return self.ranked[key].rank(ctx.budget_ms)

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


@dataclass
class Decision:
    knobs: Knobs
    index: int
    admitted: int          # configurations the guardrail admitted (-1: no guardrail)


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

    def context(self, request: Request, budget_ms: float) -> Context:
        features = self.featurizer.features(request)
        return Context(features=features, estimates=self.model.latency(features), budget_ms=float(budget_ms))

    def decide(self, request: Request, budget_ms: float, *, policy: str,
               guardrail: Optional[Guardrail] = None) -> Decision:
        if policy not in self.policies:
            raise KeyError(f"policy {policy!r} is not fitted in this controller; fitted: {', '.join(sorted(self.policies))}")
        ctx = self.context(request, budget_ms)
        order = self.policies[policy].rank(ctx)
        if guardrail is None or policy == "full":
            index, admitted = int(order[0]), -1
        else:
            mask = guardrail.admit(estimates=ctx.estimates, budget_ms=ctx.budget_ms)
            admitted = int(mask.sum())
            index = int(order[np.argmax(mask[order])]) if admitted else int(np.argmin(ctx.estimates))
        return Decision(knobs=self.space.configs[index], index=index, admitted=admitted)

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
        return self.controller.decide(request, budget_ms, policy=self.policy, guardrail=self.guardrail).knobs
