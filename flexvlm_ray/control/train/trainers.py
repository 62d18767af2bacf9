"""Training strategies for the controller (E5), registered by name in ``TRAINERS``.

Every trainer fits the same network as E4's ``learned`` policy (``learned.PolicyNet``: an MLP
from ``Featurizer.vector`` to one logit per configuration, its input normalization from free
context draws) on a ``BanditEnv`` and spends environment samples (rewards read) until a sample
budget is spent. ``Trainer.train`` evaluates the greedy policy on the held-out contexts every
``eval_every`` samples and returns the network and the learning curve.

  lut         tabular: mean reward per (task, image size class, budget bin, configuration) from
              systematic exploration (the least-tried configuration of the context's cell; one
              measurement fills every budget bin), the table's best configuration per cell distilled
              into the network (cross-entropy)
  supervised  oracle labels: a full sweep of the space per context (configs samples each), the
              best-reward configuration as the label, cross-entropy (E4's ``learned``)
  ppo         clipped policy gradient with a learned value baseline (one-step episodes)
  dpo         direct preference optimization on pairs of configurations for the same context
  grpo        group-relative policy optimization: G configurations per context, clipped ratio,
              KL to the reference policy

The losses are written from the papers (cited in each class). In a one-step bandit the return of an
action is its reward, so PPO's advantage is r - V(x) (GAE with one step) and GRPO's outcome
supervision gives every "token" (here the one action) the group-normalized reward.
"""
from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flexvlm_ray.control.features import Featurizer
from flexvlm_ray.control.learned import PolicyNet
from flexvlm_ray.control.train.bandit import BanditEnv, Evaluation
from flexvlm_ray.registry import Registry

NORM_CONTEXTS = 4096          # free context draws for the network's input normalization


CURVE_KEYS = ("reward", "oracle_fraction", "hindsight_fraction", "xfit_fraction", "normalized", "violation_rate",
              "quality")


def curve_point(*, env_samples: int, train_time_s: float, evaluation: dict[str, Evaluation]) -> dict[str, float]:
    """One learning-curve point: samples spent, training time so far (evaluation excluded), and the
    greedy policy's evaluation on the environment's requests (plain keys) and the held-out ones
    (``held_out_`` keys)."""
    point: dict[str, float] = {"env_samples": int(env_samples), "train_time_s": float(train_time_s)}
    for key in CURVE_KEYS:
        point[key] = float(getattr(evaluation["env"], key))
        point[f"held_out_{key}"] = float(getattr(evaluation["held_out"], key))
    return point


@dataclass
class TrainResult:
    trainer: str
    net: PolicyNet
    curve: list[dict[str, float]]
    hparams: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return self.curve[-1]

    def samples_to(self, fraction: float, *, key: str = "oracle_fraction") -> Optional[int]:
        """Environment samples at the first evaluation whose ``key`` reached ``fraction``."""
        return next((int(p["env_samples"]) for p in self.curve if p[key] >= fraction), None)


Report = Callable[[dict[str, float]], None]


class Trainer(ABC):
    """A training strategy: hyperparameters (``defaults``, overridable by keyword) and ``step``s that
    read rewards from the environment and update the network."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **hparams: Any) -> None:
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise ValueError(f"trainer {self.name!r} has no hyperparameter {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(self.defaults))}")
        self.hparams = {**self.defaults, **hparams}

    def __getattr__(self, key: str) -> Any:
        hparams = self.__dict__.get("hparams", {})
        if key in hparams:
            return hparams[key]
        raise AttributeError(key)

    @abstractmethod
    def setup(self, env: BanditEnv, net: PolicyNet, rng: np.random.Generator) -> None:
        """Prepare the optimizer and state; reads no reward."""

    @abstractmethod
    def step(self, env: BanditEnv, net: PolicyNet, rng: np.random.Generator) -> None:
        """One iteration: read some rewards (env.query / query_all) and update ``net``."""

    def train(self, env: BanditEnv, *, sample_budget: int, seed: int = 0, hidden: int = 64,
              eval_every: int = 500, report: Optional[Report] = None) -> TrainResult:
        """Train until ``sample_budget`` environment samples are spent (the last step may pass it),
        evaluating at 0 samples, then every ``eval_every`` samples and at the end."""
        if sample_budget <= 0 or eval_every <= 0:
            raise ValueError("sample_budget and eval_every must be positive")
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        env.samples = 0
        net = init_net(env, rng=rng, hidden=hidden, seed=seed)
        self.setup(env, net, rng)
        curve: list[dict[str, float]] = []
        elapsed = 0.0

        def evaluate() -> None:
            net.eval()
            point = curve_point(env_samples=env.samples, train_time_s=elapsed, evaluation=env.evaluate(net))
            curve.append(point)
            if report is not None:
                report(point)

        evaluate()
        next_eval = eval_every
        while env.samples < sample_budget:
            start = time.perf_counter()
            net.train()
            self.step(env, net, rng)
            elapsed += time.perf_counter() - start
            if env.samples >= next_eval or env.samples >= sample_budget:
                evaluate()
                next_eval = (env.samples // eval_every + 1) * eval_every
        net.eval()
        return TrainResult(trainer=self.name, net=net, curve=curve, hparams=dict(self.hparams),
                           info={"seed": seed, "hidden": hidden, "sample_budget": sample_budget,
                                 "parameters": net.num_parameters()})


TRAINERS: Registry[type[Trainer]] = Registry("trainer")


def register_trainer(name: str) -> Callable[[type[Trainer]], type[Trainer]]:
    def decorator(cls: type[Trainer]) -> type[Trainer]:
        cls.name = name
        return TRAINERS.register(name)(cls)
    return decorator


def make_trainer(name: str, **hparams: Any) -> Trainer:
    return TRAINERS.get(name)(**hparams)


# -- shared pieces --------------------------------------------------------------------------------
def init_net(env: BanditEnv, *, rng: np.random.Generator, hidden: int, seed: int,
             final_gain: float = 0.01) -> PolicyNet:
    """A PolicyNet with E4's initialization (Kaiming-uniform, zero bias), its input normalization from
    free context draws, and the last layer scaled by ``final_gain`` (a near-uniform first policy)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(env.contexts(*env.draw(NORM_CONTEXTS, rng)), dtype=torch.float32)
    net = PolicyNet(num_inputs=env.num_inputs, num_configs=env.num_configs, hidden=hidden)
    with torch.no_grad():
        net.mean.copy_(x.mean(0))
        net.std.copy_(x.std(0).clamp_min(1e-6))
        linears = [m for m in net.mlp if isinstance(m, nn.Linear)]
        for layer in linears:
            nn.init.kaiming_uniform_(layer.weight, a=5 ** 0.5, generator=generator)
            nn.init.zeros_(layer.bias)
        linears[-1].weight.mul_(final_gain)
    return net


def as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def sample_actions(logits: torch.Tensor, rng: np.random.Generator, size: Optional[int] = None) -> np.ndarray:
    """Configurations drawn from softmax(logits) per row (``size`` per row when given), with numpy's
    generator (deterministic for a seed)."""
    probs = torch.softmax(logits.detach().double(), dim=-1).numpy()
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0
    u = rng.random((len(probs), 1 if size is None else size))
    picks = np.minimum((u[:, :, None] > cum[:, None, :]).sum(axis=2), probs.shape[1] - 1)
    return picks[:, 0] if size is None else picks


def minibatches(n: int, size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for start in range(0, n, size):
        yield order[start:start + size]


def best_config(rewards: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """Per row the configuration with the largest reward, ties to the lower latency."""
    out = np.empty(len(rewards), int)
    for i, (r, lat) in enumerate(zip(rewards, latency)):
        out[i] = np.lexsort((lat, -r))[0]
    return out


class Dataset:
    """A growing set of training examples (numpy arrays of equal length)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, **arrays: np.ndarray) -> None:
        for key, value in arrays.items():
            self.parts.setdefault(key, []).append(np.asarray(value))

    def get(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate(value) for key, value in self.parts.items()}

    def __len__(self) -> int:
        return sum(len(v) for v in next(iter(self.parts.values()), []))


# -- the strategies -------------------------------------------------------------------------------
@register_trainer("supervised")
class SupervisedTrainer(Trainer):
    """Supervised learning from full sweeps: E4's ``learned`` policy trained online.

    Each step sweeps every configuration on ``batch`` new contexts (``configs`` samples per context)
    and runs ``updates`` Adam steps on minibatches of everything swept so far. A sweep measures each
    configuration's quality and latency on the request, so it labels the request at ``relabel``
    budgets (the drawn one and ``relabel - 1`` more drawn from the range: E4's learned policy labels
    every training request at 23 budgets) at no further sample. ``target``:

      label   cross-entropy against the oracle label, the best-reward configuration of the context
              (ties: the lower latency), as E4's learned policy trains;
      reward  the logits regress the reward vector (mean squared error), so they estimate each
              configuration's expected reward and the greedy policy takes the best estimate (uses
              every swept reward, not only which one was best)."""

    defaults = {"lr": 3e-3, "batch": 16, "updates": 8, "minibatch": 256, "weight_decay": 1e-4, "target": "label",
                "relabel": 1}

    def setup(self, env, net, rng):
        if self.target not in ("label", "reward"):
            raise ValueError(f"supervised target must be 'label' or 'reward' (got {self.target!r})")
        if int(self.relabel) < 1:
            raise ValueError(f"supervised relabel must be >= 1 (got {self.relabel})")
        self.opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.data = Dataset()

    def step(self, env, net, rng):
        idx, budget = env.draw(self.batch, rng)
        quality, latency = env.measure_all(idx)
        for k in range(int(self.relabel)):
            b = budget if k == 0 else env.draw_budgets(idx, rng)
            rewards = env.reward_of(quality=quality, latency_ms=latency, budget_ms=b[:, None])
            self.data.add(x=env.contexts(idx, b), y=best_config(rewards, latency), r=rewards)
        data = self.data.get()
        x = as_tensor(data["x"])
        y = torch.as_tensor(data["y"], dtype=torch.long) if self.target == "label" else as_tensor(data["r"])
        for _ in range(self.updates):
            mb = rng.integers(len(y), size=min(self.minibatch, len(y)))
            out = net(x[mb])
            loss = F.cross_entropy(out, y[mb]) if self.target == "label" else F.mse_loss(out, y[mb])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


@register_trainer("lut")
class LookupTableTrainer(Trainer):
    """A lookup table of mean rewards, distilled into the network.

    Cells are (task, image size class: the crop count at the largest max_crops, budget bin: one of
    ``bins`` equal bins of the budget fraction range), the keys of E4's ``lut`` policy plus the
    budget (``size`` off: (task, budget bin), fewer cells with more requests each). Each sampled
    context tries the least-tried configuration of its cell (ties at random) and updates that (cell,
    configuration)'s running mean reward: one sample per context. With ``all_bins`` the try is a measurement (``BanditEnv.measure``: quality and latency, one sample) whose
    reward at a budget drawn in every budget bin of the request's (task, size class) costs nothing more
    (as ``supervised``'s ``relabel``), so one sample updates that configuration in every bin; without
    it, only the drawn budget's bin. The table's policy is the best mean of the cell (untried
    configurations rank last); every ``distill_every`` samples the network is fitted to it
    (cross-entropy, ``distill_updates`` Adam steps, warm-started) on the contexts seen so far."""

    defaults = {"bins": 12, "batch": 64, "distill_every": 256, "distill_updates": 30, "lr": 3e-3,
                "minibatch": 256, "all_bins": True, "size": True}

    def setup(self, env, net, rng):
        tasks = sorted(set(env.env.tasks))
        sizes = sorted({self._size(env.featurizer, f) for f in env.env.requests}) if self.size else [0]
        self.task_of = {t: i for i, t in enumerate(tasks)}
        self.size_of = {s: i for i, s in enumerate(sizes)}
        self.cell_of_request = np.array([self.task_of[f.request.task] * len(sizes)
                                         + (self.size_of[self._size(env.featurizer, f)] if self.size else 0)
                                         for f in env.env.requests])
        cells = len(tasks) * len(sizes) * self.bins
        self.sums = np.zeros((cells, env.num_configs))
        self.counts = np.zeros((cells, env.num_configs))
        self.opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        self.seen = Dataset()
        self.last_distill = 0

    @staticmethod
    def _size(featurizer: Featurizer, features) -> int:
        return featurizer.size_class(features)

    def cells(self, env: BanditEnv, idx: np.ndarray, budget: np.ndarray) -> np.ndarray:
        lo, hi = env.budget_range
        frac = budget / env.p50[idx]
        b = np.clip(((frac - lo) / max(hi - lo, 1e-9) * self.bins).astype(int), 0, self.bins - 1)
        return self.cell_of_request[idx] * self.bins + b

    def bin_fractions(self, env: BanditEnv, k: int, n: int, rng: np.random.Generator) -> Optional[np.ndarray]:
        """n budget fractions inside budget bin k, drawn as the bandit draws (uniform; from its
        ``budget_levels`` in the bin when it has them, None when none is)."""
        lo, hi = env.budget_range
        width = (hi - lo) / self.bins
        if env.budget_levels is None:
            return lo + width * (k + rng.random(n))
        levels = np.asarray(env.budget_levels, float)
        inside = levels[np.clip(((levels - lo) / max(hi - lo, 1e-9) * self.bins).astype(int), 0, self.bins - 1) == k]
        return None if len(inside) == 0 else inside[rng.integers(len(inside), size=n)]

    def table_actions(self, cells: np.ndarray) -> np.ndarray:
        means = np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), -np.inf)
        return np.argmax(means[cells], axis=1)

    def step(self, env, net, rng):
        idx, budget = env.draw(self.batch, rng)
        cells = self.cells(env, idx, budget)
        configs = np.empty(len(idx), int)
        for j, cell in enumerate(cells):          # sequential: later contexts see earlier tries
            counts = self.counts[cell]
            least = np.flatnonzero(counts == counts.min())
            configs[j] = least[rng.integers(len(least))]
            self.counts[cell, configs[j]] += 1
        if not self.all_bins:
            rewards = env.query(idx, budget, configs)
            np.add.at(self.sums, (cells, configs), rewards)
            self.seen.add(x=env.contexts(idx, budget), cell=cells)
        else:
            quality, latency = env.measure(idx, configs)
            for k in range(self.bins):
                # the drawn budget stands for its own bin; every other bin gets a budget drawn inside it
                fraction = self.bin_fractions(env, k, len(idx), rng)
                if fraction is None:
                    continue
                b = np.where(cells % self.bins == k, budget, fraction * env.p50[idx])
                c = self.cells(env, idx, b)
                np.add.at(self.counts, (c, configs), (c != cells).astype(float))   # the drawn cell's is counted
                np.add.at(self.sums, (c, configs), env.reward_of(quality=quality, latency_ms=latency, budget_ms=b))
                self.seen.add(x=env.contexts(idx, b), cell=c)
        if env.samples - self.last_distill >= self.distill_every:
            self.distill(net, rng)
            self.last_distill = env.samples

    def distill(self, net: PolicyNet, rng: np.random.Generator) -> None:
        seen = self.seen.get()
        x, y = as_tensor(seen["x"]), torch.as_tensor(self.table_actions(seen["cell"]), dtype=torch.long)
        for _ in range(self.distill_updates):
            mb = rng.integers(len(y), size=min(self.minibatch, len(y)))
            loss = F.cross_entropy(net(x[mb]), y[mb])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


@register_trainer("ppo")
class PPOTrainer(Trainer):
    """Proximal Policy Optimization (Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy
    Optimization Algorithms", arXiv:1707.06347), eq. (7) and (9) over one-step episodes.

    Per iteration: ``batch`` contexts, one configuration each sampled from pi_old (one sample each);
    advantage A = r - V(x) (GAE with one step: the return is the reward), normalized over the
    batch; ``epochs`` passes of minibatches minimize

        -E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)] + c_v E[(V(x) - r)^2] - c_e E[H(pi(.|x))],

    rho = pi_theta(a|x) / pi_old(a|x). The value baseline V is a second network of the policy's
    shape with one output (it is not part of the saved policy)."""

    defaults = {"lr": 3e-3, "batch": 256, "epochs": 4, "minibatch": 64, "clip": 0.2, "value_coef": 0.5,
                "entropy_coef": 0.01}

    def setup(self, env, net, rng):
        self.value = PolicyNet(num_inputs=env.num_inputs, num_configs=1, hidden=net.hidden)
        self.value.load_state_dict({k: v for k, v in net.state_dict().items() if k in ("mean", "std")},
                                   strict=False)
        self.opt = torch.optim.Adam(list(net.parameters()) + list(self.value.parameters()), lr=self.lr)

    def loss(self, net, x, a, old_logp, adv, ret):
        logp_all = torch.log_softmax(net(x), dim=-1)
        logp = logp_all.gather(1, a[:, None])[:, 0]
        ratio = torch.exp(logp - old_logp)
        surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - self.clip, 1 + self.clip) * adv)
        value_loss = (self.value(x)[:, 0] - ret).pow(2).mean()
        entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        return -surrogate.mean() + self.value_coef * value_loss - self.entropy_coef * entropy

    def step(self, env, net, rng):
        idx, budget = env.draw(self.batch, rng)
        x = as_tensor(env.contexts(idx, budget))
        with torch.no_grad():
            logits = net(x)
            actions = sample_actions(logits, rng)
            a = torch.as_tensor(actions, dtype=torch.long)
            old_logp = torch.log_softmax(logits, -1).gather(1, a[:, None])[:, 0]
            baseline = self.value(x)[:, 0]
        ret = as_tensor(env.query(idx, budget, actions))
        adv = ret - baseline
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        for _ in range(self.epochs):
            for mb in minibatches(len(a), self.minibatch, rng):
                loss = self.loss(net, x[mb], a[mb], old_logp[mb], adv[mb], ret[mb])
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()


@register_trainer("dpo")
class DPOTrainer(Trainer):
    """Direct Preference Optimization (Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, "Direct
    Preference Optimization: Your Language Model is Secretly a Reward Model", NeurIPS, eq. (7)).

    Per iteration: ``batch`` contexts, two distinct configurations each drawn from the reference
    policy pi_ref (two samples per context); the one with the larger reward is preferred (y_w),
    ties are dropped (their samples still count). On all pairs so far, ``updates`` Adam steps of

        -E[log sigmoid(beta (log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)))].

    pi_ref is the initial network, frozen (near uniform: ``init_net``'s small last layer), which is
    also what the pairs are sampled from, as DPO's offline preference data comes from pi_ref."""

    defaults = {"lr": 3e-3, "beta": 0.5, "batch": 64, "updates": 16, "minibatch": 256}

    def setup(self, env, net, rng):
        self.reference = copy.deepcopy(net).eval()
        self.opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        self.data = Dataset()

    def step(self, env, net, rng):
        idx, budget = env.draw(self.batch, rng)
        x = env.contexts(idx, budget)
        with torch.no_grad():
            ref_logits = self.reference(as_tensor(x))
        first = sample_actions(ref_logits, rng)
        # the second: from pi_ref without the first (renormalized)
        masked = ref_logits.clone()
        masked[torch.arange(len(first)), torch.as_tensor(first)] = -torch.inf
        second = sample_actions(masked, rng)
        pair = np.stack([first, second], axis=1)
        r = env.query(idx, budget, pair)
        keep = r[:, 0] != r[:, 1]
        win = np.where(r[:, 0] > r[:, 1], pair[:, 0], pair[:, 1])[keep]
        lose = np.where(r[:, 0] > r[:, 1], pair[:, 1], pair[:, 0])[keep]
        if keep.any():
            self.data.add(x=x[keep], w=win, l=lose)
        if len(self.data) == 0:
            return
        data = self.data.get()
        xs = as_tensor(data["x"])
        w, l = torch.as_tensor(data["w"], dtype=torch.long), torch.as_tensor(data["l"], dtype=torch.long)
        with torch.no_grad():
            ref = torch.log_softmax(self.reference(xs), -1)
            ref_margin = ref.gather(1, w[:, None])[:, 0] - ref.gather(1, l[:, None])[:, 0]
        for _ in range(self.updates):
            mb = torch.as_tensor(rng.integers(len(w), size=min(self.minibatch, len(w))))
            loss = self.loss(net, xs[mb], w[mb], l[mb], ref_margin[mb])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()

    def loss(self, net, x, w, l, ref_margin):
        logp = torch.log_softmax(net(x), -1)
        margin = logp.gather(1, w[:, None])[:, 0] - logp.gather(1, l[:, None])[:, 0]
        return -F.logsigmoid(self.beta * (margin - ref_margin)).mean()


@register_trainer("grpo")
class GRPOTrainer(Trainer):
    """Group Relative Policy Optimization (Shao, Wang, Zhu, Xu, Song, Zhang, Li, Wu, Guo 2024,
    "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    arXiv:2402.03300, eq. (3) and (4), outcome supervision).

    Per iteration: ``batch`` contexts, a group of G configurations each sampled from pi_old (G
    samples per context); advantage A_i = (r_i - mean(r)) / std(r) within the group (0 when the
    group's rewards are all equal); ``epochs`` gradient steps on

        -1/G sum_i [min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i) - beta D_KL(pi_theta || pi_ref)],

    rho_i = pi_theta(o_i|x) / pi_old(o_i|x), with the paper's unbiased KL estimator (eq. 4)
    pi_ref(o_i|x) / pi_theta(o_i|x) - log(pi_ref(o_i|x) / pi_theta(o_i|x)) - 1 on the sampled
    configurations. pi_ref is the initial network, frozen."""

    defaults = {"lr": 3e-3, "group": 8, "batch": 8, "epochs": 8, "clip": 0.2, "kl_coef": 0.04}

    def setup(self, env, net, rng):
        self.reference = copy.deepcopy(net).eval()
        self.opt = torch.optim.Adam(net.parameters(), lr=self.lr)

    def step(self, env, net, rng):
        idx, budget = env.draw(self.batch, rng)
        x = as_tensor(env.contexts(idx, budget))
        with torch.no_grad():
            logits = net(x)
            groups = sample_actions(logits, rng, size=self.group)           # (batch, G)
            o = torch.as_tensor(groups, dtype=torch.long)
            old_logp = torch.log_softmax(logits, -1).gather(1, o)
            ref_logp = torch.log_softmax(self.reference(x), -1).gather(1, o)
        r = env.query(idx, budget, groups)
        std = r.std(axis=1, keepdims=True)
        adv = as_tensor(np.where(std > 1e-12, (r - r.mean(axis=1, keepdims=True)) / np.maximum(std, 1e-12), 0.0))
        for _ in range(self.epochs):
            loss = self.loss(net, x, o, old_logp, ref_logp, adv)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()

    def loss(self, net, x, o, old_logp, ref_logp, adv):
        logp = torch.log_softmax(net(x), -1).gather(1, o)
        ratio = torch.exp(logp - old_logp)
        surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - self.clip, 1 + self.clip) * adv)
        log_ref_ratio = ref_logp - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        return -(surrogate - self.kl_coef * kl).mean()
