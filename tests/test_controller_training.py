"""E5's training strategies on a contextual bandit with a known optimal policy: the synthetic rows of
flexvlm_ray.control.synthetic (stage times and quality known in closed form, no noise) at four budget
levels, so the best configuration of every context is known and every trainer must find it.

The table test is the correctness check of the losses: a trainer whose loss has a wrong sign (the
PPO / GRPO advantage, the DPO preferred and dispreferred configurations swapped, the oracle label
or the table's best taken as the worst) ends near the worst policy (about -0.1 of the optimal
reward here, checked by hand), far below the 95% asked, and PPO with max in place of min in its
clipped objective stays under 0.9."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flexvlm_ray.control import Controller
from flexvlm_ray.control.build import build_controller
from flexvlm_ray.control.synthetic import synthetic_requests, synthetic_rows, synthetic_space
from flexvlm_ray.control.train import TRAINERS, BanditEnv, RewardSpec, make_trainer
from flexvlm_ray.control.train.bandit import split
from flexvlm_ray.registry import UnknownName

LEVELS = (0.6, 0.8, 1.0, 1.3)   # budget fractions of the workload's full-configuration P50


@pytest.fixture(scope="module")
def synthetic():
    space = synthetic_space()
    requests = synthetic_requests(n=20)
    rows = synthetic_rows(requests=requests, space=space)
    controller, env = build_controller(rows=rows, requests=requests, space=space, policies=["full"], seed=0)
    bandit = BanditEnv.build(env=env, model=controller.model, featurizer=controller.featurizer, budget_levels=LEVELS)
    return controller, env, bandit


# trainer, environment samples allowed (the documented budget, docs/E5_TRAINING.md), seed 0, defaults
CORRECTNESS = [("lut", 2000), ("supervised", 4000), ("ppo", 6000), ("dpo", 6000), ("grpo", 6000)]


def test_every_registered_trainer_is_in_the_correctness_table():
    assert sorted(TRAINERS.names()) == sorted(name for name, _ in CORRECTNESS)


@pytest.mark.parametrize("name,budget", CORRECTNESS)
def test_trainer_reaches_95_percent_of_the_optimal_reward(synthetic, name, budget):
    _, _, bandit = synthetic
    torch.set_num_threads(1)
    result = make_trainer(name).train(bandit, sample_budget=budget, seed=0, eval_every=1000)
    final = result.final
    assert final["env_samples"] <= budget + 512          # a trainer's last step may pass the budget by one batch
    assert final["oracle_fraction"] >= 0.95, result.curve
    assert final["held_out_oracle_fraction"] >= 0.9      # generalizes to requests it never saw
    assert result.curve[0]["env_samples"] == 0 and result.curve[0]["oracle_fraction"] < 0.95


def test_the_synthetic_bandit_has_a_known_optimum(synthetic):
    """No noise: the context oracle (the bandit's optimal policy) is the per-request hindsight oracle,
    and it beats every fixed configuration."""
    _, env, bandit = synthetic
    base = bandit.baselines()["env"]
    assert base["oracle"] == pytest.approx(base["hindsight"])
    assert base["uniform"] < base["full"] < base["best_static"] < base["oracle"]
    assert bandit.eval_env.contexts < len(bandit.eval_env.idx)    # requests of one size and prompt look alike ...
    # ... and have the same outcomes, so the optimum over contexts is the optimum per request


def test_training_is_deterministic_for_a_seed(synthetic):
    _, _, bandit = synthetic
    a = make_trainer("ppo", batch=64).train(bandit, sample_budget=512, seed=3, eval_every=256)
    b = make_trainer("ppo", batch=64).train(bandit, sample_budget=512, seed=3, eval_every=256)
    strip = lambda curve: [{k: v for k, v in p.items() if k != "train_time_s"} for p in curve]  # noqa: E731
    assert strip(a.curve) == strip(b.curve)
    for p, q in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name,hparams,per_step", [
    ("supervised", {"batch": 4}, 4 * 8),      # a full sweep of the 8 configurations per context
    ("lut", {"batch": 8}, 8),                 # one configuration per context
    ("ppo", {"batch": 16}, 16),               # one sampled configuration per context
    ("dpo", {"batch": 8}, 16),                # a pair per context
    ("grpo", {"batch": 4, "group": 3}, 12),   # a group of G per context
])
def test_environment_samples_are_counted_per_reward_read(synthetic, name, hparams, per_step):
    _, _, bandit = synthetic
    result = make_trainer(name, **hparams).train(bandit, sample_budget=3 * per_step, seed=0, eval_every=per_step)
    assert [p["env_samples"] for p in result.curve] == [0, per_step, 2 * per_step, 3 * per_step]


@pytest.mark.parametrize("quality,latency,budget,expected", [
    (0.8, 90.0, 100.0, 0.8),                    # fits: the quality
    (0.8, 100.0, 100.0, 0.8),                   # exactly at the budget: fits
    (0.8, 150.0, 100.0, 0.8 - 1.0 * 0.5 - 0.5),  # 50% over: beta * 0.5 and the violation step gamma
    (0.0, 300.0, 100.0, -2.0 - 0.5),
])
def test_reward_formula(quality, latency, budget, expected):
    r = RewardSpec(beta=1.0, gamma=0.5)(quality=np.array([quality]), latency_ms=np.array([latency]),
                                        budget_ms=np.array([budget]))
    assert r[0] == pytest.approx(expected)
    assert RewardSpec(beta=0.0, gamma=0.0)(quality=np.array([quality]), latency_ms=np.array([latency]),
                                           budget_ms=np.array([budget]))[0] == pytest.approx(quality)


def test_reward_rejects_negative_weights():
    with pytest.raises(ValueError, match="beta and gamma"):
        RewardSpec(beta=-1.0)


def test_contexts_are_the_learned_policys_input_vectors(synthetic):
    controller, env, bandit = synthetic
    rng = np.random.default_rng(0)
    idx, budget = bandit.draw(10, rng)
    x = bandit.contexts(idx, budget)
    full = env.space.full_index
    for row, i, b in zip(x, idx, budget):
        f = env.requests[i]
        expected = controller.featurizer.vector(f, budget_ms=b, full_estimate_ms=float(controller.model.latency(f)[full]))
        np.testing.assert_allclose(row, expected, rtol=1e-12)
    assert set(np.round(budget / bandit.p50[idx], 6)) <= set(LEVELS)
    assert set(idx) <= set(bandit.train)


def test_split_holds_out_a_share_of_every_workload(synthetic):
    _, env, _ = synthetic
    train, test = split(env, held_out=0.25, seed=0)
    assert not set(train) & set(test) and len(train) + len(test) == len(env)
    for ds in set(env.datasets):
        assert (env.datasets[test] == ds).sum() == 5


def test_context_oracle_averages_requests_with_the_same_features():
    """Requests with identical features (same size, task and prompt) but different outcomes: the
    context oracle picks one configuration for all of them, the hindsight oracle the best of each."""
    space = synthetic_space()
    requests = synthetic_requests(n=20)
    rows = synthetic_rows(requests=requests, space=space)
    twin = rows["sample_id"] == rows["sample_id"].iloc[0]
    rows.loc[twin & (rows["active_blocks"] == 2), "score"] += 5.0   # one request's answers differ
    controller, env = build_controller(rows=rows, requests=requests, space=space, policies=["full"], seed=0)
    bandit = BanditEnv.build(env=env, model=controller.model, featurizer=controller.featurizer,
                             budget_levels=LEVELS, held_out=0.5)
    for ev in (bandit.eval_env, bandit.eval_held_out):
        assert ev.contexts < len(ev.idx)                     # some requests share their features
        keys = [tuple(np.round(row, 9)) for row in ev.x]
        expected = 0.0
        for key in set(keys):
            rows_of = [j for j, k in enumerate(keys) if k == key]
            expected += ev.rewards[rows_of].mean(axis=0).max() * len(rows_of)
        assert ev.oracle_reward == pytest.approx(expected / len(keys))
    assert any(ev.hindsight_reward > ev.oracle_reward + 1e-9 for ev in (bandit.eval_env, bandit.eval_held_out))


def test_a_trained_network_is_e4s_learned_policy(synthetic, tmp_path):
    controller, env, bandit = synthetic
    result = make_trainer("lut").train(bandit, sample_budget=1024, seed=0, eval_every=512)
    policy = bandit.policy(result.net, info={"trainer": "lut"})
    trained = Controller(space=controller.space, featurizer=controller.featurizer, model=controller.model,
                         policies={"learned": policy})
    loaded = Controller.load(trained.save(tmp_path / "ctl"))
    ev = bandit.eval_held_out
    greedy = bandit.greedy(result.net, ev.x)
    for j in range(0, len(ev.idx), 7):
        request = env.requests[ev.idx[j]].request
        for c in (trained, loaded):
            assert c.decide(request, ev.budget[j], policy="learned").index == greedy[j]
    assert loaded.policies["learned"].info == {"trainer": "lut"}


def test_unknown_trainer_and_hyperparameter_name_what_is_allowed():
    with pytest.raises(UnknownName, match="dpo, grpo, lut, ppo, supervised"):
        make_trainer("reinforce")
    with pytest.raises(ValueError, match="allowed: .*clip"):
        make_trainer("ppo", clipp=0.1)
