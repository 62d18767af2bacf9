"""The controller on synthetic rows with a known best configuration per budget
(flexvlm_ray.control.synthetic): one table per policy, the guardrail's bound, save / load, the
request features and the folded estimates; the decision path against the reference path and against
the decisions the committed controllers made before the decision path existed."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from decision_support import CONTROLLERS, GOLDEN, decisions

from flexvlm_ray.control import ConfigSpace, Controller, Featurizer, Guardrail, Request, RowEnvironment
from flexvlm_ray.control.build import build_controller
from flexvlm_ray.control.policies import NOT_COUNTED
from flexvlm_ray.control.synthetic import synthetic_requests, synthetic_rows, synthetic_space
from flexvlm_ray.models.base import Knobs
from flexvlm_ray.models.crops import crop_grid

POLICIES = ["full", "static", "flops_proxy", "random", "lut", "learned"]


@pytest.fixture(scope="module")
def fitted():
    space = synthetic_space()
    requests = synthetic_requests(n=20)
    rows = synthetic_rows(requests=requests, space=space)
    controller, env = build_controller(rows=rows, requests=requests, space=space, policies=POLICIES, seed=0)
    return controller, env, requests


def request(size: str, task: str = "vqa") -> Request:
    dataset = {"vqa": "vqa_set", "caption": "caption_set"}[task]
    w, h = {"small": (300, 300), "large": (1000, 700)}[size]
    return Request(request_id=f"t-{size}", width=w, height=h, prompt="how many red shapes are there?", task=task,
                   dataset=dataset)


# (policy, image size, budget ms, expected config 'crops|top_k|blocks|policy|tokens'); vqa_set latencies:
# large image 1|1|4 14.2, 1|2|4 16.4, 4|1|4 24.1, 4|2|4 27.5 ms; small image: crops 4 = crops 1
TABLE = [
    ("full", "large", 5.0, "4|2|4|prefix|12"),
    ("full", "small", 1000.0, "4|2|4|prefix|12"),
    ("static", "large", 15.0, "1|1|4|prefix|12"),
    ("static", "large", 25.0, "4|1|4|prefix|12"),
    ("static", "small", 25.0, "4|1|4|prefix|12"),      # one config per workload: the large images' best
    ("static", "large", 28.0, "4|2|4|prefix|12"),
    ("static", "large", 5.0, "1|1|2|prefix|12"),       # nothing fits: the fastest
    ("lut", "large", 15.0, "1|1|4|prefix|12"),
    ("lut", "large", 25.0, "4|1|4|prefix|12"),
    ("lut", "small", 25.0, "1|2|4|prefix|12"),         # the size class knows crops buy nothing here
    ("lut", "small", 12.0, "1|2|2|prefix|12"),
    ("lut", "large", 28.0, "4|2|4|prefix|12"),
    ("learned", "large", 15.0, "1|1|4|prefix|12"),
    ("learned", "large", 25.0, "4|1|4|prefix|12"),
    ("learned", "small", 25.0, "4|2|4|prefix|12"),     # the oracle's tie-break: best mean quality of the task
    ("learned", "large", 28.0, "4|2|4|prefix|12"),
    ("flops_proxy", "large", 1e6, "4|2|4|prefix|12"),   # everything fits: the most FLOPs (ties: the larger knobs)
    ("flops_proxy", "large", 1e-3, "1|1|2|prefix|12"),  # nothing fits: the fewest FLOPs
]


@pytest.mark.parametrize("policy,size,budget,expected", TABLE)
def test_policy_picks_the_known_config(fitted, policy, size, budget, expected):
    controller, _, _ = fitted
    decision = controller.decide(request(size), budget, policy=policy)
    assert controller.space.keys[decision.index] == expected
    assert controller.bind(policy).decide(request(size), budget) == decision.knobs


def test_flops_proxy_takes_the_largest_config_whose_scaled_flops_fit(fitted):
    controller, _, _ = fitted
    model = controller.model
    for size, budget in itertools.product(("small", "large"), (10.0, 20.0, 30.0, 45.0)):
        features = controller.featurizer.features(request(size))
        ms = model.seed_flops(features) * model.flops["ms_per_flop"]
        chosen = controller.decide(request(size), budget, policy="flops_proxy").index
        fits = np.flatnonzero(ms <= budget)
        if len(fits):
            assert ms[chosen] <= budget and model.seed_flops(features)[chosen] == model.seed_flops(features)[fits].max()


def test_random_is_uniform_over_the_estimated_fits_and_replayable(fitted):
    controller, _, _ = fitted
    chosen = set()
    for i in range(60):
        r = Request(request_id=f"r{i}", width=1000, height=700, prompt="what color is the small circle?", task="vqa",
                    dataset="vqa_set")
        estimates = controller.context(r, 25.0).estimates
        d = controller.decide(r, 25.0, policy="random")
        assert estimates[d.index] <= 25.0
        assert controller.decide(r, 25.0, policy="random").index == d.index     # same request and budget: same pick
        chosen.add(d.index)
    assert len(chosen) >= 5     # 7 configs fit; 60 uniform draws miss two of them with probability < 1e-3


@pytest.mark.parametrize("policy", POLICIES[1:])
@pytest.mark.parametrize("margin", [0.5, 0.9, 1.0, 1.2])
def test_guardrail_never_admits_a_config_estimated_over_budget_times_margin(fitted, policy, margin):
    controller, _, _ = fitted
    guard = Guardrail(margin=margin)
    for size, task, budget in itertools.product(("small", "large"), ("vqa", "caption"), np.linspace(4, 60, 15)):
        r = request(size, task)
        estimates = controller.context(r, budget).estimates
        reference = controller.decide_reference(r, budget, policy=policy, guardrail=guard)
        d = controller.decide(r, budget, policy=policy, guardrail=guard)
        assert reference.admitted == int((estimates <= budget * margin).sum())
        assert d.index == reference.index
        if reference.admitted:
            assert estimates[d.index] <= budget * margin and d.admitted == NOT_COUNTED
        else:   # nothing admitted: the config with the lowest estimate, never one the guardrail let through
            assert d.index == int(np.argmin(estimates)) and d.admitted == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_decision_path_decides_as_the_reference_path(fitted, policy):
    """decide (each policy's decider: memoized parts, lists, lazy estimates) == decide_reference (every
    feature and estimate, then rank) on every request, at budgets from nothing fits to everything fits,
    with and without the guardrail, also after its memos are emptied."""
    controller, _, requests = fitted
    others = [Request(request_id=f"o{i}", width=w, height=h, prompt=p, task=t, dataset=d)
              for i, ((w, h), p, (t, d)) in enumerate(itertools.product(
                  ((0, 0), (20, 20), (640, 480), (2000, 300)), ("", "a b c d e f g h ? !"),
                  (("vqa", "vqa_set"), ("caption", "caption_set"), ("count", "unseen_set"))))]
    for memo_cleared in (False, True):
        if memo_cleared:
            controller._estimates.clear(), controller._flops.clear(), controller._terms.clear()
            controller.featurizer._memo.clear(), controller.featurizer._prompts.clear()
        for r, budget, margin, calibrated in itertools.product(
                requests[::2] + others, (0.5, 6.0, 13.0, 15.0, 25.0, 40.0, 1e4), (None, 0.5, 0.9, 1.2), (False, True)):
            guard = Guardrail(margin, calibrated=calibrated) if margin else None
            reference = controller.decide_reference(r, budget, policy=policy, guardrail=guard)
            assert controller.decide(r, budget, policy=policy, guardrail=guard).index == reference.index, (
                r, budget, margin)


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_committed_controllers_decide_as_before_the_decision_path(name):
    """tests/data/e4_decisions.json: what the committed E4 controllers decided (at commit fa3e930, before the
    decision path) on a table of requests, budgets and guardrail margins, for every fitted policy."""
    golden = json.loads(GOLDEN.read_text())["controllers"][name]
    controller = Controller.load(CONTROLLERS[name])
    assert sorted(controller.policies) == golden["policies"]
    p50 = json.loads((CONTROLLERS[name] / "reference.json").read_text())["p50_ms"]
    assert decisions(controller, p50) == golden["decisions"]


@pytest.mark.parametrize("estimates,budget,margin,admitted", [
    ([5.0, 9.0, 10.0, 11.0], 10.0, 1.0, [True, True, True, False]),
    ([5.0, 9.0, 10.0, 11.0], 10.0, 0.9, [True, True, False, False]),
    ([12.0, 13.0], 10.0, 1.0, [False, False]),
])
def test_guardrail_admit(estimates, budget, margin, admitted):
    assert Guardrail(margin=margin).admit(estimates=np.array(estimates), budget_ms=budget).tolist() == admitted


def test_saved_and_loaded_policies_decide_the_same(fitted, tmp_path):
    controller, _, requests = fitted
    loaded = Controller.load(controller.save(tmp_path / "ctl"))
    assert (tmp_path / "ctl" / "learned.pt").is_file()
    again = Controller.from_payload(controller.to_payload())
    for r, budget, policy, guard in itertools.product(requests[::3], (6.0, 15.0, 25.0, 40.0), POLICIES,
                                                      (None, 0.9, "spread")):
        guardrail = Guardrail(1.0, calibrated=True) if guard == "spread" else Guardrail(guard) if guard else None
        first = controller.decide(r, budget, policy=policy, guardrail=guardrail)
        assert loaded.decide(r, budget, policy=policy, guardrail=guardrail) == first
        assert again.decide(r, budget, policy=policy, guardrail=guardrail) == first


def test_learned_policy_is_small_and_saved_with_its_feature_schema(fitted, tmp_path):
    import torch

    controller, _, _ = fitted
    learned = controller.policies["learned"]
    assert learned.net.num_parameters() < 300_000
    controller.save(tmp_path)
    saved = torch.load(tmp_path / "learned.pt", weights_only=True)
    assert saved["schema"]["features"] == controller.featurizer.vector_names()
    assert learned.info["train_accuracy"] > 0.9


def test_env_oracle_and_step(fitted):
    _, env, _ = fitted
    keys = env.space.keys
    large = next(i for i, f in enumerate(env.requests) if f.request.width == 1000 and f.request.task == "vqa")
    assert keys[env.oracle(request=large, budget_ms=25.0)] == "4|1|4|prefix|12"
    assert keys[env.oracle(request=large, budget_ms=1.0)] == "1|1|2|prefix|12"      # nothing fits: the fastest
    step = env.step(request=large, config=keys.index("4|1|4|prefix|12"), budget_ms=20.0)
    assert step["violated"] and step["quality"] == pytest.approx(1.0)


def test_env_drops_requests_without_every_config():
    space = synthetic_space()
    requests = synthetic_requests(n=4)
    rows = synthetic_rows(requests=requests, space=space)
    rows = rows.drop(index=rows.index[0])
    featurizer = Featurizer(max_crops_values=tuple(space.max_crops_values))
    env = RowEnvironment.from_rows(rows, requests={(r.dataset, r.request_id): featurizer.features(r) for r in requests},
                                   space=space)
    assert len(env) == len(requests) - 1


@pytest.mark.parametrize("width,height", [(300, 300), (1000, 700), (640, 480), (480, 640), (2000, 300), (20, 20),
                                          (1337, 999)])
def test_featurizer_crop_counts_equal_molmo_tiling(width, height):
    values = (1, 2, 4, 6, 9, 12, None)
    crops = Featurizer(max_crops_values=values).crops(Request("x", width, height, "q"))
    for m in values:
        rows, cols = crop_grid(height=height, width=width, max_crops=m or 12)
        assert crops[m] == rows * cols + 1


def test_folded_latency_equals_the_estimator(fitted):
    controller, _, requests = fitted
    for r in requests:
        f = controller.featurizer.features(r)
        np.testing.assert_allclose(controller.model.latency(f), controller.model.latency_reference(f), rtol=1e-9)


def test_estimates_match_the_measured_rows(fitted):
    controller, env, _ = fitted
    for i, f in enumerate(env.requests):
        np.testing.assert_allclose(controller.model.latency(f), env.latency[i], rtol=1e-6)


def test_space_full_is_the_largest_config():
    space = ConfigSpace.of([Knobs(max_crops=c, top_k=k, active_blocks=b) for c, k, b in
                            itertools.product((1, 12), (1, 8), (8, 16))])
    assert space.full == Knobs(max_crops=12, top_k=8, active_blocks=16)
    with pytest.raises(ValueError, match="repeated"):
        ConfigSpace.of([Knobs(), Knobs()])


def test_unknown_policy_lists_the_registered_ones(fitted):
    from flexvlm_ray.control import POLICIES as REGISTRY

    with pytest.raises(KeyError, match="Available: flops_proxy, full, learned, learned:dpo, learned:grpo, learned:lut, learned:ppo, learned:supervised, lut, random, static"):
        REGISTRY.get("nope")


@pytest.fixture(scope="module")
def noisy():
    """Synthetic rows with log-normal noise (sigma 0.3) on every pass: a spread well above 1."""
    space = synthetic_space()
    requests = synthetic_requests(n=30)
    rows = synthetic_rows(requests=requests, space=space, noise=0.3, seed=1)
    controller, env = build_controller(rows=rows, requests=requests, space=space, policies=["lut", "learned"],
                                       seed=0, options={"learned": {"epochs": 50}})
    return controller, env, rows, requests


def test_spread_is_the_quantile_of_measured_over_estimated_latency(fitted, noisy):
    clean, _, _ = fitted
    for spread in clean.model.spread.values():      # noise-free rows: the estimator is (nearly) exact
        assert np.allclose(spread, 1.0, atol=0.05)
    controller, _, rows, requests = noisy
    features = {(r.dataset, r.request_id): controller.featurizer.features(r) for r in requests}
    keys = controller.space.keys
    for task in ("vqa", "caption"):
        part = rows[rows["task"] == task]
        for c, key in enumerate(keys):
            mine = part[part["config"] == key]
            ratios = [t / controller.model.latency(features[(d, s)])[c]
                      for d, s, t in zip(mine["dataset"], mine["sample_id"], mine["T_total"])]
            assert controller.model.spread[task][c] == pytest.approx(np.quantile(ratios, 0.95))
        assert min(controller.model.spread[task]) > 1.2          # exp(1.645 * 0.3) = 1.64 at P95, less the fit's share


def test_calibrated_guardrail_admits_only_what_fits_at_the_spread(noisy):
    controller, _, _, requests = noisy
    guard = Guardrail(1.0, calibrated=True)
    for r, budget in itertools.product(requests[::5], np.linspace(4, 60, 12)):
        estimates = controller.context(r, budget).estimates
        spread = np.asarray(controller.model.spread[r.task])
        d = controller.decide(r, budget, policy="lut", guardrail=guard)
        admitted = estimates * spread <= budget
        if admitted.any():
            assert estimates[d.index] * spread[d.index] <= budget
        else:
            assert d.index == int(np.argmin(estimates * spread))


def test_calibrated_guardrail_needs_a_controller_with_a_spread(fitted):
    controller, env, requests = fitted
    from flexvlm_ray.control.policies import Controller as C

    bare = C(space=controller.space, featurizer=controller.featurizer,
             model=type(controller.model).from_dict({**controller.model.to_dict(), "spread": None},
                                                    space=controller.space),
             policies=controller.policies)
    with pytest.raises(ValueError, match="latency spread"):
        bare.decide(requests[0], 20.0, policy="lut", guardrail=Guardrail(1.0, calibrated=True))


def test_lut_prior_and_pooled_spread():
    """A size cell's quality shrinks towards its task's; its latency quantile is its median x the task's spread."""
    from flexvlm_ray.control.policies import LookupTablePolicy

    space = synthetic_space()
    requests = synthetic_requests(n=20)
    rows = synthetic_rows(requests=requests, space=space)
    featurizer = Featurizer(max_crops_values=tuple(space.max_crops_values), tasks=("caption", "vqa"))
    env = RowEnvironment.from_rows(rows, requests={(r.dataset, r.request_id): featurizer.features(r) for r in requests},
                                   space=space)
    plain = LookupTablePolicy.fit(env=env, featurizer=featurizer)
    shrunk = LookupTablePolicy.fit(env=env, featurizer=featurizer, prior=10.0, pooled_spread=True)
    for key, cell in plain.cells.items():
        if key in ("*", "vqa/*", "caption/*"):
            assert shrunk.cells[key]["quality"] == (cell["quality"] if key == "*" else shrunk.cells[key]["quality"])
            continue
        parent = plain.cells[key.split("/")[0] + "/*"]["quality"]
        n = cell["n"]
        assert np.allclose(shrunk.cells[key]["quality"],
                           (n * np.asarray(cell["quality"]) + 10 * np.asarray(parent)) / (n + 10))
        # noise-free rows: a cell's requests differ only by their prompts' few words, so the spread is about 1
        assert np.allclose(shrunk.cells[key]["latency"], cell["latency"], rtol=0.01)


def test_offline_cross_validation_replays_held_out_requests(noisy):
    from flexvlm_ray.control.offline import cross_validate, folds_of, summarize

    _, _, rows, requests = noisy
    folds = folds_of(requests, folds=3, seed=0)
    assert sorted(r.request_id + r.dataset for f in folds for r in f) == sorted(r.request_id + r.dataset for r in requests)
    replayed = cross_validate(rows=rows, requests=requests, space=synthetic_space(), policies=["full", "static", "lut"],
                              guarded=["lut"], guardrails=(Guardrail(1.0, calibrated=True),), folds=3,
                              fractions=(0.5, 1.0), options={"learned": {"epochs": 5}})
    assert len(replayed) == 4 * 2 * len(requests) and set(replayed["fold"]) == {0, 1, 2}
    table = summarize(replayed)
    full = table[table["policy"] == "full"]
    assert np.allclose(full["retained"], 1.0)
    assert (full[full["budget_fraction"] == 0.5]["violation"] > 0.9).all()     # the full config at half its P50
    guarded = table[(table["policy"] == "lut+guard") & (table["budget_fraction"] == 1.0)]
    assert (guarded["violation"] <= full[full["budget_fraction"] == 1.0]["violation"].to_numpy()).all()
