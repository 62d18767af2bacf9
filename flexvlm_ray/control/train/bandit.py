"""The controller's training problem as a one-step contextual bandit over profiled rows (E5).

A context is (request, budget): a training request of a ``RowEnvironment`` and a budget drawn as a
fraction (uniform in ``budget_range``, 0.2 to 1.3 by default, the range E4's learned policy trains
at) of its workload's training full-configuration P50 ``T_total``. The action is one configuration
of the space; the reward is what the request measured under it::

    r = q / q_ref  -  beta * max(0, L - B) / B  -  gamma * 1[L > B]

with q the request's measured quality, L its measured ``T_total`` (the whole request, ms), B the
budget, and q_ref the workload's mean full-configuration training quality (``normalize``, so a
CIDEr of 2 and a VQA accuracy of 1 weigh the same; off: q_ref = 1). ``RewardSpec`` holds beta and
gamma (1.0 and 0.5 by default).

The policy sees the learned policy's input vector (``Featurizer.vector``: request features, log
budget, log budget over the estimated full-configuration latency), so a trained ``PolicyNet`` is
E4's ``learned`` policy (``BanditEnv.policy``). A greedy policy picks the configuration with the
largest logit, as ``LearnedPolicy.rank`` does.

Environment samples are counted: every reward a trainer reads (``query``: one per (context,
configuration)) adds one to ``samples``; drawing contexts (features and budgets, no reward) is
free. Evaluation (``evaluate``) reads the held-out requests at a fixed grid of budget fractions and
counts nothing. Each evaluation set has three references (``EvalSet``): the context oracle (per
distinct policy input the best mean reward: the optimum of the finite bandit, which, where every
request's input differs, knows each request's outcome), the hindsight oracle (per request the best:
an upper bound) and the cross-fitted reference (``cross_fitted``: a per-cell best configuration chosen
on other requests than the one it is scored on: what a feature-based policy can earn without seeing
the evaluated request's outcome).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from flexvlm_ray.control.env import RowEnvironment
from flexvlm_ray.control.estimate import CandidateModel
from flexvlm_ray.control.features import Featurizer
from flexvlm_ray.control.learned import PolicyNet

BUDGET_RANGE = (0.2, 1.3)                       # x the workload's training full-config P50
EVAL_FRACTIONS = tuple(np.round(np.linspace(0.2, 1.3, 12), 3))


@dataclass(frozen=True)
class RewardSpec:
    """r = q / q_ref - beta * max(0, L - B) / B - gamma * 1[L > B] (see the module docstring)."""

    beta: float = 1.0
    gamma: float = 0.5
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.beta < 0 or self.gamma < 0:
            raise ValueError(f"reward beta and gamma must be >= 0 (got beta={self.beta}, gamma={self.gamma})")

    def __call__(self, *, quality: np.ndarray, latency_ms: np.ndarray, budget_ms: np.ndarray) -> np.ndarray:
        over = np.maximum(latency_ms - budget_ms, 0.0) / budget_ms
        return quality - self.beta * over - self.gamma * (latency_ms > budget_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evaluation:
    reward: float
    oracle_reward: float           # the context oracle (see EvalSet)
    oracle_fraction: float         # reward / oracle reward (nan when the oracle's is <= 0)
    hindsight_reward: float        # the per-request hindsight oracle (E4's RowEnvironment.oracle, by reward)
    hindsight_fraction: float
    xfit_reward: float             # the cross-fitted reference (EvalSet.xfit_reward)
    xfit_fraction: float           # reward / cross-fitted reference reward
    normalized: float              # (reward - uniform) / (oracle - uniform): 0 random, 1 oracle
    violation_rate: float
    quality: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# The cells of the cross-fitted reference, coarse to fine: the policy inputs (``Featurizer.vector_names``,
# by name or name prefix) that key a cell. A finer partition backs off to the coarser ones where its cell
# holds no other request. None: every input (the context oracle's cells).
PARTITIONS: tuple[tuple[str, Optional[tuple[str, ...]]], ...] = (
    ("task+budget", ("task=", "log_budget_ms")),
    ("task+budget+crops", ("task=", "log_budget_ms", "log_crops@")),
    ("task+budget+image", ("task=", "log_budget_ms", "log_crops@", "log_width", "log_height")),
    ("all inputs", None),
)


def cells_of(x: np.ndarray, names: list[str], inputs: Optional[tuple[str, ...]]) -> np.ndarray:
    """Cell ids (0..k-1) of the rows of ``x``: equal (rounded) values of the named inputs (None: all)."""
    cols = (np.arange(x.shape[1]) if inputs is None else
            np.array([j for j, n in enumerate(names) if any(n == p or (p.endswith(("=", "@")) and n.startswith(p))
                                                             for p in inputs)], int))
    if len(cols) == 0:
        return np.zeros(len(x), int)
    _, cell = np.unique(np.round(x[:, cols], 9), axis=0, return_inverse=True)
    return cell.reshape(-1)


def cross_fitted_choice(*, fit_rewards: np.ndarray, fit_cells: list[np.ndarray], fit_groups: np.ndarray,
                        eval_cells: list[np.ndarray], eval_groups: np.ndarray) -> np.ndarray:
    """Per evaluated row, the configuration with the best mean reward over the fitting rows of its cell
    whose group (request) differs from the row's own: a choice that never reads the evaluated
    request's outcome. ``fit_cells`` / ``eval_cells``: one cell id array per level, coarse to fine,
    with ids shared between the two sets (a level's cell means the same inputs in both); a row whose
    finest cell holds no other request takes the next coarser level's choice, and a row no level
    covers the best mean over every fitting row of another group. Ties: the lower configuration
    index. The fitting and evaluated rows may be the same rows (leave one request out) or different
    ones (fit on the training requests, score the held-out ones)."""
    fit_rewards = np.asarray(fit_rewards, float)
    k = fit_rewards.shape[1]
    groups = np.unique(np.concatenate([fit_groups, eval_groups]), return_inverse=True)[1]
    fg, eg = groups[:len(fit_groups)], groups[len(fit_groups):]
    # fallback: every fitting row of another group
    total, total_n = fit_rewards.sum(axis=0), len(fit_rewards)
    own = np.zeros((groups.max() + 1, k))
    np.add.at(own, fg, fit_rewards)
    own_n = np.bincount(fg, minlength=groups.max() + 1)
    sums, counts = total[None, :] - own[eg], total_n - own_n[eg]
    choice = np.where(counts > 0, np.argmax(sums, axis=1), 0)
    for fc, ec in zip(fit_cells, eval_cells):
        cells = int(max(fc.max(initial=-1), ec.max(initial=-1))) + 1
        cell_sum = np.zeros((cells, k))
        np.add.at(cell_sum, fc, fit_rewards)
        cell_n = np.bincount(fc, minlength=cells)
        pair = fc.astype(np.int64) * (groups.max() + 1) + fg           # (cell, group) of each fitting row
        upair, pinv = np.unique(pair, return_inverse=True)
        pair_sum = np.zeros((len(upair), k))
        np.add.at(pair_sum, pinv.reshape(-1), fit_rewards)
        pair_n = np.bincount(pinv.reshape(-1), minlength=len(upair))
        want = ec.astype(np.int64) * (groups.max() + 1) + eg
        at = np.searchsorted(upair, want)
        found = (at < len(upair)) & (upair[np.minimum(at, len(upair) - 1)] == want)
        s = cell_sum[ec] - np.where(found[:, None], pair_sum[np.minimum(at, len(upair) - 1)], 0.0)
        c = cell_n[ec] - np.where(found, pair_n[np.minimum(at, len(upair) - 1)], 0)
        choice = np.where(c > 0, np.argmax(s, axis=1), choice)
    return choice


class EvalSet:
    """Fixed contexts (requests x budget fractions) with every configuration's reward, and three references:

    - the context oracle: per distinct policy input (feature vector and budget), the configuration
      with the best mean reward over the requests that share it. It is the optimal policy of the
      finite contextual bandit (a policy sees the features, not the request's outcome); with every
      request's features distinct it equals the hindsight oracle, and as an estimate of what a
      feature-based policy earns on requests it has not seen it is biased upward (the max over
      configurations of means of one or a few requests);
    - the hindsight oracle: per request, the configuration with the best reward on that request
      (knows whether this request's answer comes out right: an upper bound);
    - the cross-fitted reference (``set_cross_fitted``): per partition of ``PARTITIONS`` the
      per-cell best configuration chosen on other requests (leave one request out on the
      environment's requests; fitted on the environment's requests for the held-out ones) and
      scored on the request; the reference is the best partition's value (the max over four, so if
      anything generous). It never reads the scored request's outcome.
    """

    def __init__(self, *, bandit: "BanditEnv", requests: np.ndarray) -> None:
        fractions = np.asarray(bandit.eval_fractions, float)
        self.idx = np.repeat(requests, len(fractions))
        self.budget = np.tile(fractions, len(requests)) * bandit.p50[self.idx]
        self.x = bandit.contexts(self.idx, self.budget)
        self.rewards = bandit.rewards(self.idx, self.budget)
        self.latency = bandit.env.latency[self.idx]
        self.quality = bandit.quality[self.idx]
        self.hindsight_reward = float(self.rewards.max(axis=1).mean())
        self.uniform_reward = float(self.rewards.mean())
        _, group = np.unique(np.round(self.x, 9), axis=0, return_inverse=True)
        group = group.reshape(-1)
        sums = np.zeros((group.max() + 1, self.rewards.shape[1]))
        np.add.at(sums, group, self.rewards)
        counts = np.bincount(group)
        self.oracle_reward = float((sums.max(axis=1)).sum() / counts.sum())
        self.contexts = int(len(counts))
        self.xfit_reward, self.xfit_partition = float("nan"), None      # set_cross_fitted
        self.partitions: dict[str, dict[str, Any]] = {}

    def set_cross_fitted(self, *, fit: "EvalSet", names: list[str]) -> None:
        """The cross-fitted reference of this set, its choices fitted on ``fit``'s rows (this set itself:
        leave one request out). Per partition: the in-sample cell oracle (max of the cell means on this
        set: the context oracle's estimate at that partition) and the cross-fitted value."""
        rows = np.arange(len(self.idx))
        levels_fit: list[np.ndarray] = []
        levels_eval: list[np.ndarray] = []
        self.partitions = {}
        for name, inputs in PARTITIONS:
            both = cells_of(np.concatenate([fit.x, self.x]), names, inputs)
            levels_fit.append(both[:len(fit.x)])
            levels_eval.append(both[len(fit.x):])
            choice = cross_fitted_choice(fit_rewards=fit.rewards, fit_cells=levels_fit, fit_groups=fit.idx,
                                         eval_cells=levels_eval, eval_groups=self.idx)
            own = levels_eval[-1]
            sums = np.zeros((own.max() + 1, self.rewards.shape[1]))
            np.add.at(sums, own, self.rewards)
            self.partitions[name] = {"cross_fitted": float(self.rewards[rows, choice].mean()),
                                     "in_sample": float(sums.max(axis=1).sum() / len(own)),
                                     "cells": int(len(np.unique(own)))}
        best = max(self.partitions, key=lambda p: self.partitions[p]["cross_fitted"])
        self.xfit_partition, self.xfit_reward = best, self.partitions[best]["cross_fitted"]

    def evaluate(self, actions: np.ndarray) -> Evaluation:
        rows = np.arange(len(actions))
        reward = float(self.rewards[rows, actions].mean())
        return Evaluation(reward=reward, oracle_reward=self.oracle_reward,
                          oracle_fraction=_ratio(reward, self.oracle_reward),
                          hindsight_reward=self.hindsight_reward,
                          hindsight_fraction=_ratio(reward, self.hindsight_reward),
                          xfit_reward=self.xfit_reward, xfit_fraction=_ratio(reward, self.xfit_reward),
                          normalized=(reward - self.uniform_reward) / max(self.oracle_reward - self.uniform_reward, 1e-12),
                          violation_rate=float((self.latency[rows, actions] > self.budget).mean()),
                          quality=float(self.quality[rows, actions].mean()))

    def by_fraction(self, actions: np.ndarray, *, fractions: tuple[float, ...]) -> list[dict[str, float]]:
        """Per budget fraction: mean reward, quality and violation rate of ``actions`` (a frontier)."""
        rows = np.arange(len(actions))
        reward = self.rewards[rows, actions].reshape(-1, len(fractions))
        quality = self.quality[rows, actions].reshape(-1, len(fractions))
        violated = (self.latency[rows, actions] > self.budget).reshape(-1, len(fractions))
        return [{"budget_fraction": float(f), "reward": float(reward[:, j].mean()), "quality": float(quality[:, j].mean()),
                 "violation_rate": float(violated[:, j].mean())} for j, f in enumerate(fractions)]

    def baselines(self, *, full_index: int, fractions: int) -> dict[str, float]:
        per_fraction = self.rewards.reshape(-1, fractions, self.rewards.shape[1]).mean(axis=0)
        return {"oracle": self.oracle_reward, "hindsight": self.hindsight_reward,
                "cross_fitted": self.xfit_reward, "cross_fitted_partition": self.xfit_partition,
                "partitions": self.partitions, "uniform": self.uniform_reward,
                "full": float(self.rewards[:, full_index].mean()),
                "best_static": float(per_fraction.max(axis=1).mean()), "contexts": self.contexts,
                "rows": int(len(self.idx))}


@dataclass
class BanditEnv:
    """Contexts, rewards and the held-out evaluation over a ``RowEnvironment``.

    ``full_estimate_ms[i]``: the estimated full-configuration latency of request i (the learned
    policy's feature); ``train`` / ``held_out``: request indices (``split``)."""

    env: RowEnvironment
    featurizer: Featurizer
    full_estimate_ms: np.ndarray
    train: np.ndarray
    held_out: np.ndarray
    reward: RewardSpec = field(default_factory=RewardSpec)
    budget_range: tuple[float, float] = BUDGET_RANGE
    eval_fractions: tuple[float, ...] = EVAL_FRACTIONS
    budget_levels: Optional[tuple[float, ...]] = None
    samples: int = 0

    def __post_init__(self) -> None:
        env = self.env
        lo, hi = self.budget_range
        if not 0 < lo <= hi:
            raise ValueError(f"budget_range must be 0 < low <= high (got {self.budget_range})")
        if self.budget_levels is not None:
            if not self.budget_levels or min(self.budget_levels) <= 0:
                raise ValueError(f"budget_levels must be positive fractions (got {self.budget_levels})")
            self.budget_levels = tuple(float(v) for v in self.budget_levels)
            self.budget_range = (min(self.budget_levels), max(self.budget_levels))
        if len(self.train) == 0 or len(self.held_out) == 0:
            raise ValueError("the bandit needs training and held-out requests")
        names = self.featurizer.vector_names()
        if names[:2] != ["log_budget_ms", "log_budget_over_full_estimate"]:
            raise ValueError(f"unexpected feature schema {names[:2]}")
        self.base = np.stack([self.featurizer.vector(f, budget_ms=1.0, full_estimate_ms=float(e))
                              for f, e in zip(env.requests, self.full_estimate_ms)])
        datasets = sorted(set(env.datasets))
        p50 = {ds: env.full_p50(dataset=ds) for ds in datasets}
        self.p50 = np.array([p50[ds] for ds in env.datasets], float)
        full = env.space.full_index
        q_ref = {ds: float(env.quality[env.datasets == ds, full].mean()) for ds in datasets}
        scale = np.array([q_ref[ds] if self.reward.normalize and q_ref[ds] > 0 else 1.0 for ds in env.datasets])
        self.quality = env.quality / scale[:, None]
        # evaluation: the environment's own requests (the bandit's context distribution) and the held-out
        # requests (generalization), each at every evaluation fraction
        self.eval_env = EvalSet(bandit=self, requests=self.train)
        self.eval_held_out = EvalSet(bandit=self, requests=self.held_out)
        # the cross-fitted reference: leave one request out on the environment's requests, fitted on them for
        # the held-out ones
        self.eval_env.set_cross_fitted(fit=self.eval_env, names=names)
        self.eval_held_out.set_cross_fitted(fit=self.eval_env, names=names)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, *, env: RowEnvironment, model: CandidateModel, featurizer: Featurizer,
              reward: Optional[RewardSpec] = None, held_out: float = 0.25, split_seed: int = 0,
              budget_range: tuple[float, float] = BUDGET_RANGE,
              eval_fractions: tuple[float, ...] = EVAL_FRACTIONS,
              budget_levels: Optional[tuple[float, ...]] = None) -> "BanditEnv":
        """``budget_levels``: draw budget fractions from these values only (a finite context set, as
        the correctness tests use); the evaluation then uses the same levels."""
        full = env.space.full_index
        estimates = np.array([float(model.latency(f)[full]) for f in env.requests])
        train, test = split(env, held_out=held_out, seed=split_seed)
        return cls(env=env, featurizer=featurizer, full_estimate_ms=estimates, train=train, held_out=test,
                   reward=reward or RewardSpec(), budget_range=tuple(budget_range),
                   eval_fractions=tuple(budget_levels or eval_fractions),
                   budget_levels=None if budget_levels is None else tuple(budget_levels))

    @property
    def num_configs(self) -> int:
        return len(self.env.space)

    @property
    def num_inputs(self) -> int:
        return self.base.shape[1]

    # -- contexts (free) ------------------------------------------------------------------------
    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n training contexts: request indices and budgets (ms)."""
        idx = self.train[rng.integers(len(self.train), size=n)]
        return idx, self.draw_budgets(idx, rng)

    def contexts(self, idx: np.ndarray, budget_ms: np.ndarray) -> np.ndarray:
        """The learned policy's input vectors (``Featurizer.vector``) of the contexts."""
        x = self.base[idx].copy()
        b = np.maximum(np.asarray(budget_ms, float), 1e-3)
        x[:, 0] = np.log(b)
        x[:, 1] = np.log(b / np.maximum(self.full_estimate_ms[idx], 1e-3))
        return x

    # -- rewards (counted) ----------------------------------------------------------------------
    def rewards(self, idx: np.ndarray, budget_ms: np.ndarray) -> np.ndarray:
        """(n, configs) rewards of every configuration; not counted (evaluation and tests only)."""
        b = np.asarray(budget_ms, float)[:, None]
        return self.reward(quality=self.quality[idx], latency_ms=self.env.latency[idx], budget_ms=b)

    def query(self, idx: np.ndarray, budget_ms: np.ndarray, configs: np.ndarray) -> np.ndarray:
        """The reward of ``configs[j]`` on context j: one environment sample each."""
        idx, configs = np.asarray(idx), np.asarray(configs)
        b = np.asarray(budget_ms, float)
        self.samples += int(configs.size)
        if configs.ndim == 2:          # several configurations per context (a group, a pair)
            idx, b = idx[:, None], b[:, None]
        return self.reward(quality=self.quality[idx, configs], latency_ms=self.env.latency[idx, configs],
                           budget_ms=b)

    def measure(self, idx: np.ndarray, configs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What running ``configs[j]`` on request ``idx[j]`` measures: (quality, latency ms), one
        environment sample each. The budget is the request's, not the run's: ``reward_of`` turns one
        measurement into the reward at any budget (what E4's table and oracle labels use)."""
        idx, configs = np.asarray(idx), np.asarray(configs)
        self.samples += int(configs.size)
        return self.quality[idx, configs], self.env.latency[idx, configs]

    def measure_all(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every configuration on each request (a full sweep): configs samples per request."""
        idx = np.asarray(idx)
        self.samples += int(len(idx)) * self.num_configs
        return self.quality[idx], self.env.latency[idx]

    def reward_of(self, *, quality: np.ndarray, latency_ms: np.ndarray, budget_ms: np.ndarray) -> np.ndarray:
        return self.reward(quality=quality, latency_ms=latency_ms, budget_ms=budget_ms)

    def draw_budgets(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Budgets (ms) for given requests, drawn as ``draw`` does."""
        if self.budget_levels is None:
            fractions = rng.uniform(*self.budget_range, size=len(idx))
        else:
            fractions = np.asarray(self.budget_levels)[rng.integers(len(self.budget_levels), size=len(idx))]
        return fractions * self.p50[idx]

    def query_all(self, idx: np.ndarray, budget_ms: np.ndarray) -> np.ndarray:
        """Every configuration's reward on each context (a full sweep): configs samples per context."""
        self.samples += int(len(idx)) * self.num_configs
        return self.rewards(idx, budget_ms)

    # -- evaluation (not counted) ---------------------------------------------------------------
    def greedy(self, net: PolicyNet, x: np.ndarray) -> np.ndarray:
        """The greedy policy's configurations (largest logit, as E4's learned policy ranks)."""
        import torch

        with torch.no_grad():
            return np.argmax(net(torch.as_tensor(x, dtype=torch.float32)).numpy(), axis=1)

    def evaluate(self, net: PolicyNet) -> dict[str, Evaluation]:
        """The greedy policy on the environment's requests ("env") and on the held-out ones ("held_out")."""
        return {"env": self.eval_env.evaluate(self.greedy(net, self.eval_env.x)),
                "held_out": self.eval_held_out.evaluate(self.greedy(net, self.eval_held_out.x))}

    def baselines(self) -> dict[str, dict[str, float]]:
        """Reference rewards per evaluation set: context and hindsight oracles, the cross-fitted reference
        (and each partition's in-sample and cross-fitted value), uniform random, the full configuration,
        the best single configuration per budget fraction chosen in hindsight."""
        kw = {"full_index": self.env.space.full_index, "fractions": len(self.eval_fractions)}
        return {"env": self.eval_env.baselines(**kw), "held_out": self.eval_held_out.baselines(**kw)}

    def policy(self, net: PolicyNet, *, info: Optional[dict[str, Any]] = None):
        """The trained network as E4's ``learned`` policy (same featurizer, same decisions)."""
        from flexvlm_ray.control.policies import LearnedPolicy

        return LearnedPolicy(net=net, featurizer=self.featurizer, full_index=self.env.space.full_index, info=info)

    def describe(self) -> dict[str, Any]:
        return {"requests": len(self.env), "train_requests": int(len(self.train)),
                "held_out_requests": int(len(self.held_out)), "configs": self.num_configs,
                "inputs": self.num_inputs, "reward": self.reward.to_dict(), "budget_range": list(self.budget_range),
                "budget_levels": None if self.budget_levels is None else list(self.budget_levels),
                "eval_fractions": [float(f) for f in self.eval_fractions],
                "baselines": self.baselines()}


def _ratio(reward: float, reference: float) -> float:
    return reward / reference if reference > 0 else float("nan")


def split(env: RowEnvironment, *, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out request indices, ``held_out`` of each workload held out (at least one)."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1) (got {held_out})")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for ds in sorted(set(env.datasets)):
        idx = np.flatnonzero(env.datasets == ds)
        idx = idx[rng.permutation(len(idx))]
        k = max(1, int(round(held_out * len(idx)))) if len(idx) > 1 else 0
        test += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.sort(np.asarray(train, int)), np.sort(np.asarray(test, int))
