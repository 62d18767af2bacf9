"""Controller studies on profiled rows (no Ray, no model): M6 generalisation and E6 ablations.

Both use E4's protocol on rows instead of the workers: per evaluation request and budget fraction f in
``EVAL_BUDGETS`` (E4's 0.35, 0.5, 0.7, 0.85, 1.0) the budget is f x the workload's full-configuration
P50 ``T_total`` (over all of that workload's profiled requests: the reference E4 measures on the
held-out requests), the trained network decides from the request's features (greedy, as
``LearnedPolicy.rank``; with the guardrail the first configuration whose estimated ``T_total`` <=
budget x ``margin``, none: the lowest estimate, as ``Controller.decide``), and the request's measured
quality and ``T_total`` under that configuration are what it gets (``RowEnvironment``: the median pass).
The network is trained by an E5 trainer (``TRAINERS``) on the bandit of the variant's training
requests only (``BanditEnv``: budgets 0.2 to 1.3 x P50, reward q / q_ref - beta overshoot - gamma
violation).

A ``Variant`` restricts what the controller sees and may do:

  configs          the configuration keys it may choose (the knob ablations: crops only, crops + top_k,
                   all; a mask strategy's blocks); every subset holds the full configuration
  train_datasets   the workloads it trains on (M6: some; the rest are ``out`` of distribution). Its
                   featurizer knows only their tasks (an unseen task's one-hot is all zero) and its
                   latency estimates are fitted on their rows only
  guardrail        the E3 guardrail on or off
  budget_feature   off: the two budget inputs (log B, log B / estimated full latency) are constant 0,
                   in training and evaluation (the network cannot see the budget)
  eval_model       M6's second model: base's trained controller (same trainer and seed) decides on base's
                   held-out requests, but what it gets is what another model measured on those requests
                   (``run_variant``'s ``scored_on``: a run of the same grid on that model); budgets are
                   fractions of that model's full P50, its quality normalized by its own full mean

``run_variant`` returns one record per (request, budget, policy): the controller, and two baselines on
the same contexts: ``full`` and ``static`` (per budget fraction the configuration with the best mean
training reward, chosen on the bandit's training requests). ``split`` is ``in`` (the training
workloads' requests held out of the bandit, never trained on) or ``out`` (every request of a workload
the variant did not train on). Quality is also given normalized (``quality_norm``: / the workload's
mean full-configuration quality) so that CIDEr-D and accuracies pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from flexvlm_ray.control.env import RowEnvironment
from flexvlm_ray.control.estimate import CandidateModel, Guardrail, config_column
from flexvlm_ray.control.features import Featurizer, Request, RequestFeatures
from flexvlm_ray.control.space import ConfigSpace
from flexvlm_ray.control.train.bandit import BanditEnv, RewardSpec
from flexvlm_ray.control.train.trainers import make_trainer

EVAL_BUDGETS = (0.35, 0.5, 0.7, 0.85, 1.0)    # E4's budget fractions
BASE = "base"                                 # E6: every knob, no guardrail, the budget seen; M6: every workload


@dataclass
class Prepared:
    """Profiled rows over a space with the features of every request they measured."""

    rows: pd.DataFrame
    features: dict[tuple[str, str], RequestFeatures]
    space: ConfigSpace
    geometry: dict[str, Any]
    env: RowEnvironment                      # every request with the whole space

    @classmethod
    def of(cls, *, rows: pd.DataFrame, requests: list[Request], space: ConfigSpace,
           geometry: Optional[dict[str, Any]] = None) -> "Prepared":
        featurizer = Featurizer(max_crops_values=tuple(space.max_crops_values), geometry=dict(geometry or {}),
                                tasks=tuple(sorted({r.task for r in requests})))
        features = {(r.dataset, r.request_id): featurizer.features(r) for r in requests}
        rows = rows[rows["status"] == "ok"].copy()
        rows["config"] = config_column(rows)
        rows["prompt_words"] = [features[(d, s)].prompt_words if (d, s) in features else None
                                for d, s in zip(rows["dataset"], rows["sample_id"])]
        if "task" not in rows:
            rows["task"] = [features[(d, s)].request.task if (d, s) in features else None
                            for d, s in zip(rows["dataset"], rows["sample_id"])]
        rows = rows[rows["prompt_words"].notna() & rows["config"].isin(space.keys)]
        env = RowEnvironment.from_rows(rows, requests=features, space=space)
        return cls(rows=rows, features=features, space=space, geometry=dict(geometry or {}), env=env)

    @property
    def datasets(self) -> list[str]:
        return sorted(set(self.env.datasets))


@dataclass(frozen=True)
class Variant:
    name: str
    configs: Optional[tuple[str, ...]] = None          # config keys; None: the whole space
    train_datasets: Optional[tuple[str, ...]] = None   # None: every workload
    guardrail: bool = False
    budget_feature: bool = True
    group: str = ""                                    # the ablation it belongs to (E6 table rows)
    eval_model: str = ""                               # M6: evaluated on another model's rows (its label)
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


class NoBudgetBandit(BanditEnv):
    """The bandit whose contexts hide the budget (its two inputs constant 0)."""

    def contexts(self, idx, budget_ms):
        x = super().contexts(idx, budget_ms)
        x[:, :2] = 0.0
        return x


def subset(env: RowEnvironment, idx: np.ndarray, columns: Optional[np.ndarray] = None,
           space: Optional[ConfigSpace] = None) -> RowEnvironment:
    cols = np.arange(len(env.space)) if columns is None else np.asarray(columns)
    return RowEnvironment(space=space or env.space, requests=[env.requests[i] for i in idx],
                          latency=env.latency[np.ix_(idx, cols)], quality=env.quality[np.ix_(idx, cols)])


def run_variant(prepared: Prepared, variant: Variant, *, trainer: str, seed: int, samples: int,
                hparams: Optional[dict[str, Any]] = None, reward: Optional[RewardSpec] = None, held_out: float = 0.25,
                margin: float = 0.9, hidden: int = 64, budgets: tuple[float, ...] = EVAL_BUDGETS,
                scored_on: Optional[dict[Variant, Prepared]] = None) -> pd.DataFrame:
    """Train the variant's controller and evaluate it and the baselines (see the module docstring);
    ``scored_on``: per ``Variant.eval_model`` variant, another model's rows that the same trained controller's
    decisions on the held-out requests are also scored on (their records carry that variant's name)."""
    reward = reward or RewardSpec()
    keys = list(variant.configs) if variant.configs is not None else prepared.space.keys
    missing = sorted(set(keys) - set(prepared.space.keys))
    if missing:
        raise ValueError(f"variant {variant.name!r}: configurations not in the rows' space: {missing}")
    columns = np.array([prepared.space.keys.index(k) for k in keys])
    space = ConfigSpace.of([prepared.space.configs[c] for c in columns])
    env_all = subset(prepared.env, np.arange(len(prepared.env)), columns, space)
    train_sets = tuple(variant.train_datasets or prepared.datasets)
    unknown = sorted(set(train_sets) - set(prepared.datasets))
    if unknown:
        raise ValueError(f"variant {variant.name!r}: no rows of training workloads {unknown}; "
                         f"the rows have {', '.join(prepared.datasets)}")
    train_mask = np.isin(env_all.datasets, train_sets)
    env_train = subset(env_all, np.flatnonzero(train_mask))
    featurizer = Featurizer(max_crops_values=tuple(space.max_crops_values), geometry=prepared.geometry,
                            tasks=tuple(sorted(set(env_train.tasks))))
    rows = prepared.rows[prepared.rows["config"].isin(space.keys) & prepared.rows["dataset"].isin(train_sets)]
    model = CandidateModel.fit(rows, space=space)
    base = BanditEnv.build(env=env_train, model=model, featurizer=featurizer, reward=reward, held_out=held_out,
                           split_seed=seed)
    bandit = base if variant.budget_feature else NoBudgetBandit(
        env=base.env, featurizer=featurizer, full_estimate_ms=base.full_estimate_ms, train=base.train,
        held_out=base.held_out, reward=reward)
    result = make_trainer(trainer, **(hparams or {})).train(bandit, sample_budget=samples, seed=seed, hidden=hidden,
                                                            eval_every=samples)
    net = result.net
    full = space.full_index
    fr = np.asarray(budgets, float)
    # static: per budget fraction, the best mean training reward over the bandit's training requests
    static = {f: int(np.argmax(bandit.rewards(bandit.train, f * bandit.p50[bandit.train]).mean(axis=0))) for f in fr}

    def decisions(label: Variant, env_eval: RowEnvironment, idx: np.ndarray, split: np.ndarray) -> pd.DataFrame:
        """The controller's and the baselines' records on ``env_eval``'s requests ``idx`` at every budget."""
        p50 = {ds: env_eval.full_p50(dataset=ds) for ds in sorted(set(env_eval.datasets))}
        q_ref = {ds: float(env_eval.quality[env_eval.datasets == ds, full].mean()) for ds in p50}
        estimates = np.stack([model.latency(env_eval.requests[i]) for i in idx])
        ii = np.repeat(np.arange(len(idx)), len(fr))                # position in idx
        req = idx[ii]
        frac = np.tile(fr, len(idx))
        budget = frac * np.array([p50[ds] for ds in env_eval.datasets[req]])
        x = np.stack([featurizer.vector(env_eval.requests[r], budget_ms=b, full_estimate_ms=float(estimates[j, full]))
                      for r, b, j in zip(req, budget, ii)])
        if not variant.budget_feature:
            x[:, :2] = 0.0
        import torch

        with torch.no_grad():
            logits = net(torch.as_tensor(x, dtype=torch.float32)).numpy()
        order = np.argsort(-logits, axis=1, kind="stable")
        if variant.guardrail:
            guard = Guardrail(margin=margin)
            chosen = np.empty(len(req), int)
            for k in range(len(req)):
                mask = guard.admit(estimates=estimates[ii[k]], budget_ms=float(budget[k]))
                chosen[k] = order[k][np.argmax(mask[order[k]])] if mask.any() else int(np.argmin(estimates[ii[k]]))
        else:
            chosen = order[:, 0]
        policies = {"controller": chosen, "full": np.full(len(req), full), "static": np.array([static[f] for f in frac])}
        lat, qual = env_eval.latency[req], env_eval.quality[req]
        scale = np.array([q_ref[ds] if reward.normalize and q_ref[ds] > 0 else 1.0 for ds in env_eval.datasets[req]])
        all_rewards = reward(quality=qual / scale[:, None], latency_ms=lat, budget_ms=budget[:, None])
        records = []
        rows_n = np.arange(len(req))
        for name, action in policies.items():
            records.append(pd.DataFrame({
                "variant": label.name, "group": label.group, "trainer": trainer, "seed": seed, "policy": name,
                "guardrail": bool(variant.guardrail) and name == "controller", "budget_feature": variant.budget_feature,
                "configs": len(space), "train_datasets": ",".join(train_sets), "split": split[ii],
                "dataset": env_eval.datasets[req].astype(str), "task": env_eval.tasks[req].astype(str),
                "sample_id": [env_eval.requests[r].request.request_id for r in req],
                "budget_fraction": frac, "budget_ms": budget, "config": [space.keys[a] for a in action],
                "quality": qual[rows_n, action], "quality_full": qual[:, full],
                "quality_norm": qual[rows_n, action] / np.where(scale > 0, scale, 1.0),
                "quality_full_norm": qual[:, full] / np.where(scale > 0, scale, 1.0),
                "latency_ms": lat[rows_n, action], "violated": lat[rows_n, action] > budget,
                "reward": all_rewards[rows_n, action], "hindsight_reward": all_rewards.max(axis=1),
                "train_env_samples": int(result.final["env_samples"]), "eval_model": label.eval_model,
            }))
        return pd.concat(records, ignore_index=True)

    # evaluation contexts: the bandit's held-out requests ("in") and every request of the other workloads ("out")
    in_idx = np.flatnonzero(train_mask)[bandit.held_out]
    out_idx = np.flatnonzero(~train_mask)
    frames = [decisions(variant, env_all, np.concatenate([in_idx, out_idx]),
                        np.array(["in"] * len(in_idx) + ["out"] * len(out_idx)))]
    held = [(str(env_all.datasets[i]), env_all.requests[i].request.request_id) for i in in_idx]
    for label, other in (scored_on or {}).items():   # the same held-out requests, as another model measured them
        env_other, idx = other_model_env(other, keys=keys, space=space, requests=held)
        frames.append(decisions(label, env_other, idx, np.array(["in"] * len(idx))))
    return pd.concat(frames, ignore_index=True)


def other_model_env(other: Prepared, *, keys: list[str], space: ConfigSpace,
                    requests: list[tuple[str, str]]) -> tuple[RowEnvironment, np.ndarray]:
    """``other``'s environment over ``keys`` (in that order) and the positions of ``requests`` (dataset,
    request id) in it; a clear error when the other rows lack a configuration or any of the requests."""
    missing = sorted(set(keys) - set(other.space.keys))
    if missing:
        raise ValueError(f"the other model's rows lack configurations {missing}: run the same grid on it")
    env = subset(other.env, np.arange(len(other.env)), np.array([other.space.keys.index(k) for k in keys]), space)
    position = {(str(d), r.request.request_id): i for i, (d, r) in enumerate(zip(env.datasets, env.requests))}
    absent = [key for key in requests if key not in position]
    if absent:
        raise ValueError(f"the other model's rows lack {len(absent)} of the {len(requests)} held-out requests "
                         f"(first: {absent[0][0]} {absent[0][1]}): run the same datasets and samples on it")
    return env, np.array([position[key] for key in requests], dtype=int)


# -- the studies' variants ------------------------------------------------------------------------------
def knob_subsets(space: ConfigSpace) -> dict[str, tuple[str, ...]]:
    """E6's knob ablation: crops only (top_k, blocks, policy, tokens at the full configuration's), crops +
    top_k (blocks at full), all: each a subset of the space's keys that holds the full configuration."""
    full = space.full

    def keep(*free: str) -> tuple[str, ...]:
        fixed = [f for f in ("max_crops", "top_k", "active_blocks", "block_policy", "max_new_tokens") if f not in free]
        return tuple(k for c, k in zip(space.configs, space.keys)
                     if all(getattr(c, f) == getattr(full, f) for f in fixed))

    return {"crops": keep("max_crops"), "crops+top_k": keep("max_crops", "top_k"), "all": tuple(space.keys)}


def e6_variants(space: ConfigSpace) -> list[Variant]:
    """E6 on one space: the base (every knob, no guardrail, the budget seen) and one change each: the knobs
    restricted (crops; crops + top_k), the guardrail on, the budget feature off."""
    subsets = knob_subsets(space)
    return [Variant(name=BASE, group="base"),
            Variant(name="knobs=crops", configs=subsets["crops"], group="knobs"),
            Variant(name="knobs=crops+top_k", configs=subsets["crops+top_k"], group="knobs"),
            Variant(name="guardrail=on", guardrail=True, group="guardrail"),
            Variant(name="budget_feature=off", budget_feature=False, group="budget feature")]


def mask_variants(space: ConfigSpace) -> list[Variant]:
    """E6's mask strategy: per block policy, the configurations of that policy (the full one included)."""
    out = []
    for policy in sorted({c.block_policy for c in space.configs}):
        keys = tuple(k for c, k in zip(space.configs, space.keys) if c.block_policy == policy)
        out.append(Variant(name=f"mask={policy}", configs=keys, group="mask strategy"))
    return out


def m6_variants(datasets: list[str], splits: list[tuple[str, ...]], models: tuple[str, ...] = ()) -> list[Variant]:
    """M6: trained on every workload (in distribution only), then on each listed group of workloads; per other
    model, base's controller scored on that model's rows (``Variant.eval_model``)."""
    out = [Variant(name=BASE, train_datasets=tuple(datasets), group="base")]
    out += [Variant(name="train=" + "+".join(s), train_datasets=tuple(s), group="generalisation") for s in splits]
    out += [Variant(name=f"model={m}", train_datasets=tuple(datasets), group="model", eval_model=m) for m in models]
    return out


def run_study(prepared: Prepared, variants: list[Variant], *, trainers: list[str], seeds: list[int], samples: int,
              hparams: Optional[dict[str, dict[str, Any]]] = None, say=None,
              other_models: Optional[dict[str, Prepared]] = None, **kwargs: Any) -> pd.DataFrame:
    """Every variant x trainer x seed, in the variants' order. A ``Variant.eval_model`` variant trains nothing:
    base's controller of the same trainer and seed is scored on ``other_models[eval_model]`` as well."""
    scored = [v for v in variants if v.eval_model]
    frames: dict[str, list[pd.DataFrame]] = {v.name: [] for v in variants}
    for variant in (v for v in variants if not v.eval_model):
        for trainer in trainers:
            for seed in seeds:
                if say is not None:
                    say(f"{variant.name} {trainer} seed {seed}")
                frame = run_variant(prepared, variant, trainer=trainer, seed=seed, samples=samples,
                                    hparams=(hparams or {}).get(trainer), scored_on={
                                        v: (other_models or {})[v.eval_model] for v in scored} if variant.name == BASE
                                    else None, **kwargs)
                for name, part in frame.groupby("variant", sort=False):
                    frames[name].append(part)
    return pd.concat([f for v in variants for f in frames[v.name]], ignore_index=True)
