"""E5's trained networks as E4 policies: ``learned:<trainer>`` (``learned:ppo``, ``learned:dpo``, ...).

Each is E4's ``learned`` policy (``policies.LearnedPolicy``: the same ``PolicyNet``, feature vector and
ranking by logits) whose network is trained by a registered E5 trainer (``control.train.TRAINERS``) on the
contextual bandit of the controller's training rows (``control.train.BanditEnv``: reward
``q / q_ref - beta * max(0, L - B) / B - gamma * 1[L > B]``, budgets 0.2 to 1.3 x each workload's
training full-configuration P50) instead of E4's supervised oracle labels. A closed-loop spec lists the
policy by name and sets the training in ``control.trained`` (samples, held_out, beta, gamma, hparams per
trainer); the driver fits it with the other policies on the run's ``train`` rows, and the workers decide
with it on the held-out requests like any policy (with or without the guardrail).

The weights travel in the controller's payload as base64 text (``controller.json``), with the feature
schema, the trainer, its hyperparameters and its final curve point (``info``).
"""
from __future__ import annotations

import base64
import time
from typing import Any, Iterable, Optional

from flexvlm_ray.control.env import RowEnvironment
from flexvlm_ray.control.estimate import CandidateModel
from flexvlm_ray.control.features import Featurizer
from flexvlm_ray.control.learned import PolicyNet
from flexvlm_ray.control.policies import LearnedPolicy, register_policy
from flexvlm_ray.control.train import TRAINERS, BanditEnv, RewardSpec, make_trainer

PREFIX = "learned:"
TRAINED_KEYS = ("samples", "held_out", "beta", "gamma", "eval_every", "hparams")


def trainer_of(policy: str) -> Optional[str]:
    """'learned:ppo' -> 'ppo'; any other policy name -> None."""
    return policy[len(PREFIX):] if policy.startswith(PREFIX) else None


class TrainedPolicy(LearnedPolicy):
    """The learned policy's network trained by the E5 trainer ``trainer`` (set per registered name)."""

    trainer = ""

    @classmethod
    def fit(cls, *, env: RowEnvironment, model: CandidateModel, featurizer: Featurizer, seed: int = 0,
            hidden: int = 64, samples: int = 10_000, held_out: float = 0.25, beta: float = 1.0, gamma: float = 0.5,
            eval_every: int = 1000, hparams: Optional[dict[str, Any]] = None, **_: Any) -> "TrainedPolicy":
        bandit = BanditEnv.build(env=env, model=model, featurizer=featurizer, reward=RewardSpec(beta=beta, gamma=gamma),
                                 held_out=held_out, split_seed=seed)
        start = time.perf_counter()
        result = make_trainer(cls.trainer, **(hparams or {})).train(bandit, sample_budget=samples, seed=seed,
                                                                    hidden=hidden, eval_every=eval_every)
        info = {"trainer": cls.trainer, "hparams": result.hparams, "seed": seed, "hidden": hidden,
                "sample_budget": samples, "env_samples": int(result.final["env_samples"]),
                "wall_s": time.perf_counter() - start, "reward": RewardSpec(beta=beta, gamma=gamma).to_dict(),
                "bandit": {"train_requests": int(len(bandit.train)), "held_out_requests": int(len(bandit.held_out))},
                "final": {k: float(v) for k, v in result.final.items()}}
        return cls(net=result.net, featurizer=featurizer, full_index=env.space.full_index, info=info)

    def to_dict(self) -> dict[str, Any]:
        weights = self.net.to_bytes(schema=self.schema())
        return {"trainer": self.trainer, "info": self.info, "weights_b64": base64.b64encode(weights).decode("ascii")}

    @classmethod
    def from_dict(cls, data, *, featurizer, **_):
        net, schema = PolicyNet.from_bytes(base64.b64decode(data["weights_b64"]))
        if schema["features"] != featurizer.vector_names():
            raise ValueError(f"policy {cls.name}: its feature schema does not match the controller's featurizer")
        return cls(net=net, featurizer=featurizer, full_index=int(schema["full_index"]), info=schema.get("info"))


def _register(trainer: str) -> type[TrainedPolicy]:
    cls = type(f"Trained_{trainer}", (TrainedPolicy,), {"trainer": trainer, "__module__": __name__,
                                                         "__doc__": f"E4's learned network trained by E5's {trainer!r}."})
    return register_policy(f"{PREFIX}{trainer}")(cls)


TRAINED_POLICIES = {name: _register(name) for name in TRAINERS.names()}


def trained_options(policies: Iterable[str], *, trained: Optional[dict[str, Any]], hidden: int) -> dict[str, dict[str, Any]]:
    """Controller.fit options of every ``learned:<trainer>`` in ``policies`` from a spec's ``control.trained``
    (a plain dict of TRAINED_KEYS; None: the defaults)."""
    trained = dict(trained or {})
    hparams = trained.pop("hparams", None) or {}
    out = {}
    for name in policies:
        trainer = trainer_of(name)
        if trainer is not None:
            out[name] = {**{k: v for k, v in trained.items() if k in TRAINED_KEYS}, "hidden": hidden,
                         "hparams": dict(hparams.get(trainer, {}))}
    return out
