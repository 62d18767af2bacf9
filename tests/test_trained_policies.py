"""E5's trained networks in E4's closed loop: the ``learned:<trainer>`` policies (control.trained).

A spec lists ``learned:ppo`` (and the others) in ``control.policies`` and sets their training in
``control.trained``; the Controller trains each with its E5 trainer on the bandit of the training rows,
the payload carries the weights, and the workers decide with the trained network (the slow test: the
tiny model, 2 logical GPUs, every control row's knobs are the trained net's argmax for that request and
budget, and the net is the one the trainer gives on the run's training rows)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis_support import SWEEPS, cpu_overrides
from flexvlm_ray.control import POLICIES, Controller, Guardrail
from flexvlm_ray.control.build import build_controller
from flexvlm_ray.control.synthetic import synthetic_requests, synthetic_rows, synthetic_space
from flexvlm_ray.control.train import TRAINERS, BanditEnv, RewardSpec, make_trainer
from flexvlm_ray.control.trained import trained_options, trainer_of
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import SpecError, load_spec_text

SPEC = """
name: t
experiment: e4
model: {family: simulated, options: {decode_ms_per_token: 0.5}}
datasets: [{name: shapes_vqa, split: validation, num_samples: 4, shards: 2}]
knobs: {max_crops: [1, 4], top_k: [1, 8], active_blocks: [8, 16]}
measure: {warmup: 0, decode_mode: natural}
control: {policies: [static, learned:ppo, {name: learned:grpo, guardrail: true}], budgets: [0.5, 1.0], train_samples: 6}
"""


def test_every_trainer_is_a_policy():
    assert {f"learned:{t}" for t in TRAINERS.names()} <= set(POLICIES.names())
    assert trainer_of("learned:dpo") == "dpo" and trainer_of("learned") is None and trainer_of("lut") is None


@pytest.mark.parametrize("override,message", [
    ("control.trained.hparams={nope: {lr: 1}}", "control.trained.hparams: unknown trainer nope; allowed: dpo, grpo, lut, ppo, supervised"),
    ("control.trained.samples=0", "control.trained.samples: Input should be greater than or equal to 1"),
    ("control.trained.held_out=1", "control.trained.held_out: Input should be less than 1"),
    ("control.trained.bogus=1", "control.trained.bogus: unknown key"),
    ("control.policies=[learned:nope]", "control.policies.0.name: Input should be"),
])
def test_bad_trained_settings_name_the_key(override, message):
    with pytest.raises(SpecError) as info:
        load_spec_text(SPEC, source="x.yaml", overrides=[override])
    assert any(message in line for line in info.value.problems), info.value.problems


def test_trained_settings_change_only_the_control_units_and_unset_keeps_the_hash():
    from flexvlm_ray.run.launch import spec_hash

    spec = load_spec_text(SPEC, source="x.yaml")
    assert "trained" not in spec.control.model_dump() and "trained" not in spec.model_dump(mode="json")["control"]
    units = expand(spec)
    other = load_spec_text(SPEC, source="x.yaml", overrides=["control.trained={samples: 500}"])
    assert other.control.trained.samples == 500 and spec_hash(other) != spec_hash(spec)
    changed = {u.unit_id for u in units} ^ {u.unit_id for u in expand(other)}
    assert changed and all(u.control["role"] == "control" for u in units + expand(other) if u.unit_id in changed)
    options = trained_options(["static", "learned:ppo", "learned:grpo"], hidden=32,
                              trained=other.control.trained.model_dump() | {"hparams": {"ppo": {"lr": 0.01}}})
    assert set(options) == {"learned:ppo", "learned:grpo"}
    assert options["learned:ppo"]["hparams"] == {"lr": 0.01} and options["learned:grpo"]["hparams"] == {}
    assert options["learned:ppo"]["samples"] == 500 and options["learned:ppo"]["hidden"] == 32


@pytest.fixture(scope="module")
def synthetic():
    space = synthetic_space()
    requests = synthetic_requests(n=16)
    rows = synthetic_rows(requests=requests, space=space)
    return space, requests, rows


@pytest.mark.parametrize("trainer", ["ppo", "supervised"])
def test_the_controller_decides_with_the_trainers_network(synthetic, trainer, tmp_path):
    """The fitted policy's network is the trainer's on the same bandit (same seed), its decisions are the
    argmax of that network's logits, and save / load keeps them."""
    import torch

    torch.set_num_threads(1)
    space, requests, rows = synthetic
    name = f"learned:{trainer}"
    options = trained_options([name], hidden=32, trained={"samples": 800, "eval_every": 400})
    controller, env = build_controller(rows=rows, requests=requests, space=space, policies=["full", name], seed=3,
                                       options=options)
    policy = controller.policies[name]
    assert policy.info["trainer"] == trainer and policy.info["env_samples"] >= 800

    bandit = BanditEnv.build(env=env, model=controller.model, featurizer=controller.featurizer,
                             reward=RewardSpec(), held_out=0.25, split_seed=3)
    direct = make_trainer(trainer).train(bandit, sample_budget=800, seed=3, hidden=32, eval_every=400)
    state = policy.net.state_dict()
    assert all(torch.allclose(state[k], v) for k, v in direct.net.state_dict().items())

    loaded = Controller.load(controller.save(tmp_path / "c"))
    saved = json.loads((tmp_path / "c" / "controller.json").read_text())["policies"][name]
    assert saved["trainer"] == trainer and "weights_b64" in saved
    p50 = env.full_p50()
    for request in requests[:8]:
        for fraction in (0.3, 0.7, 1.2):
            budget = fraction * p50
            ctx = controller.context(request, budget)
            x = controller.featurizer.vector(ctx.features, budget_ms=budget,
                                             full_estimate_ms=float(ctx.estimates[space.full_index]))
            best = int(np.argmax(direct.net.logits(x)))
            assert controller.decide(request, budget, policy=name).index == best
            for guard in (None, Guardrail(0.9)):
                assert (loaded.decide(request, budget, policy=name, guardrail=guard).index
                        == controller.decide(request, budget, policy=name, guardrail=guard).index)


@pytest.mark.slow
def test_closed_loop_runs_the_trained_network_on_the_tiny_model_and_two_logical_gpus(ray_local, tmp_path):
    import torch

    from flexvlm_ray.analysis.registry import analyze_run
    from flexvlm_ray.control import Request
    from flexvlm_ray.data import DATASETS
    from flexvlm_ray.models.base import Knobs
    from flexvlm_ray.run.controller_tune import bandit_from_run
    from flexvlm_ray.run.launch import launch
    from flexvlm_ray.spec.load import load_spec
    from flexvlm_ray.store.reader import load_frame

    overrides = cpu_overrides("e4_end_to_end") + [
        "control.policies=[learned:ppo, {name: learned:ppo, guardrail: true}]",
        "control.trained={samples: 600, eval_every: 300}",
        "datasets=[{name: shapes_vqa, split: validation, num_samples: 4, shards: 2}]"]
    run_dir, summary = launch(spec_path=str(SWEEPS / "e4_end_to_end.yaml"), overrides=overrides,
                              output=str(tmp_path / "out"), run_id="r", num_gpus=2, progress=False)
    assert summary.ok and summary.done == 8 + 2 + 2 * 2 * 2
    rows = load_frame(run_dir)
    control = rows[rows["role"] == "control"]
    assert set(control["status"]) == {"ok"} and set(control["policy"]) == {"learned:ppo", "learned:ppo+guard"}
    assert len(json.loads((run_dir / "env.json").read_text())["workers"]) == 2

    controller = Controller.load(run_dir / "control")
    policy = controller.policies["learned:ppo"]
    assert policy.info["trainer"] == "ppo" and policy.info["sample_budget"] == 600
    # the net is PPO's on the bandit of this run's training rows (same requests, reward, split and seed)
    torch.set_num_threads(1)
    bandit = bandit_from_run(run_dir, held_out=0.25, split_seed=0)
    direct = make_trainer("ppo").train(bandit, sample_budget=600, seed=0, hidden=64, eval_every=300)
    samples = {s.sample_id: s for s in DATASETS.get("shapes_vqa").load(split="validation", num_samples=4, seed=0,
                                                                        path=None)}
    control_spec = load_spec(run_dir / "spec.yaml").control   # the guardrail the workers built (control.loop)
    guard = Guardrail(margin=control_spec.margin, calibrated=control_spec.guard_quantile is not None)
    for row in control.itertuples():
        request = Request.of_sample(samples[row.sample_id], dataset=row.dataset)
        ran = Knobs(max_crops=int(row.max_crops), top_k=int(row.top_k), active_blocks=int(row.active_blocks),
                    block_policy=row.block_policy, max_new_tokens=int(row.max_new_tokens))
        expected = controller.decide(request, row.budget_ms, policy="learned:ppo",
                                     guardrail=guard if row.guardrail else None)
        assert ran == expected.knobs, (row.policy, row.budget_ms, row.sample_id)
        if not row.guardrail:   # the trained net's own choice: the argmax of PPO's logits
            ctx = controller.context(request, row.budget_ms)
            x = controller.featurizer.vector(ctx.features, budget_ms=row.budget_ms,
                                             full_estimate_ms=float(ctx.estimates[controller.space.full_index]))
            assert expected.index == int(np.argmax(direct.net.logits(x)))
    analyze_run(run_dir)
    result = json.loads((run_dir / "analysis" / "e4.json").read_text())
    assert {"learned:ppo", "learned:ppo+guard"} <= set(result["cells"]["shapes_vqa"])


def test_cpu_learned_sweep_runs_every_trainer_against_static_and_the_guarded_table():
    """sweeps/e4_cpu_tiny_learned.yaml (the committed closed-loop run of docs/E5_TRAINING.md): E4's CPU grid, one
    learned:<trainer> per E5 trainer with E5's shown hyperparameters, and static, lut, lut+guard for comparison."""
    from flexvlm_ray.spec.load import load_spec

    spec = load_spec(SWEEPS / "e4_cpu_tiny_learned.yaml")
    names = [p if isinstance(p, str) else p.name for p in spec.control.policies]
    assert sorted(n for n in names if trainer_of(n)) == sorted(f"learned:{t}" for t in TRAINERS.names())
    assert {"full", "static", "lut"} <= set(names)
    assert any(not isinstance(p, str) and p.name == "lut" and p.guardrail for p in spec.control.policies)
    trained = spec.control.trained
    assert trained.samples == 10_000 and trained.hparams["supervised"] == {"relabel": 8, "target": "label"}
    for trainer, hparams in trained.hparams.items():
        make_trainer(trainer, **hparams)                 # every hyperparameter is the trainer's own
    units = expand(spec)
    control = [u for u in units if u.control["role"] == "control"]
    assert len(control) == len(names) * 5 * 3           # every policy x 5 budgets x 3 shards
    small = load_spec(SWEEPS / "e4_cpu_tiny_learned.yaml", overrides=cpu_overrides("e4_cpu_tiny_learned"))
    assert small.control.trained.samples == 500 and small.control.train_samples == 4
