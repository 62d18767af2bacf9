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
counts nothing. The oracle is hindsight: per held-out context the configuration with the best
reward on that request, so its mean is an upper bound that a policy seeing only features may not
reach when the quality of one request is noisy (one answer right or wrong).
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
    normalized: float              # (reward - uniform) / (oracle - uniform): 0 random, 1 oracle
    violation_rate: float
    quality: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class EvalSet:
    """Fixed contexts (requests x budget fractions) with every configuration's reward, and two oracles:

    - the context oracle: per distinct policy input (feature vector and budget), the configuration
      with the best mean reward over the requests that share it. It is the optimal policy of the
      contextual bandit (a policy sees the features, not the request's outcome); with every request's
      features distinct it equals the hindsight oracle;
    - the hindsight oracle: per request, the configuration with the best reward on that request
      (knows whether this request's answer comes out right: an upper bound).
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

    def evaluate(self, actions: np.ndarray) -> Evaluation:
        rows = np.arange(len(actions))
        reward = float(self.rewards[rows, actions].mean())
        return Evaluation(reward=reward, oracle_reward=self.oracle_reward,
                          oracle_fraction=_ratio(reward, self.oracle_reward),
                          hindsight_reward=self.hindsight_reward,
                          hindsight_fraction=_ratio(reward, self.hindsight_reward),
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
        return {"oracle": self.oracle_reward, "hindsight": self.hindsight_reward, "uniform": self.uniform_reward,
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
        """Reference rewards per evaluation set: context and hindsight oracles, uniform random, the full
        configuration, the best single configuration per budget fraction chosen in hindsight."""
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
