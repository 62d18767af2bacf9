"""Knobs on the tiny flexmoe model, verified by effect: top_k, active blocks (with KV-cache
consistency), forced output length, exact restore, cached importance scores, verify-knobs."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from flexvlm_ray.data.base import Sample
from flexvlm_ray.commands import verify_knobs as verify_mod
from flexvlm_ray.knobs.blocks import block_influence, select_blocks
from flexvlm_ray.knobs.moe import temporary_top_k
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.flexmoe.adapter import FlexMoeAdapter


def make_adapter(seed: int = 0, **options) -> FlexMoeAdapter:
    return MODELS.get("flexmoe")(preset="tiny", path=None, dtype="float32", device="cpu", seed=seed,
                                 options=options)


SAMPLE = Sample(sample_id="k", image=Image.new("RGB", (640, 512), (10, 200, 90)), prompt="how many dogs ?")


def run(adapter: FlexMoeAdapter, knobs: Knobs = Knobs()):
    prepared = adapter.prepare(sample=SAMPLE, knobs=knobs)
    embeds = adapter.projector(prepared, adapter.vision_encoder(prepared))
    return prepared, embeds, adapter.prefill(prepared, embeds)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXVLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def tiny() -> FlexMoeAdapter:
    return make_adapter()


# -- top_k -------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2, 3, 8])
def test_top_k_sets_routed_experts_per_token(tiny, top_k):
    per_token: Counter = Counter()

    def hook(module, args, output):
        _, weights, indices = output
        per_token.update((indices.sort(dim=-1).values.diff(dim=-1) != 0).sum(dim=-1).add(1).tolist())

    tiny.apply_knobs(Knobs(top_k=top_k))
    handles = [r.register_forward_hook(hook) for r in tiny.moe_routers()]
    _, _, state = run(tiny)
    tiny.decode_step(state)
    for h in handles:
        h.remove()
    assert set(per_token) == {top_k}
    assert all(r.top_k == top_k for r in tiny.moe_routers())
    tiny.restore_knobs()
    assert all(r.top_k == 2 for r in tiny.moe_routers())


def test_top_k_changes_the_output(tiny):
    _, _, ref = run(tiny)
    tiny.apply_knobs(Knobs(top_k=1))
    _, _, got = run(tiny)
    assert not torch.equal(ref.extras["logits"], got.extras["logits"])


@pytest.mark.parametrize("knobs, message", [
    (Knobs(top_k=0), r"top_k=0 is out of range: allowed 1\.\.8"),
    (Knobs(top_k=9), r"top_k=9 is out of range: allowed 1\.\.8"),
    (Knobs(active_blocks=0), r"active_blocks=0 is out of range: allowed 1\.\.4"),
    (Knobs(active_blocks=5), r"active_blocks=5 is out of range: allowed 1\.\.4"),
    (Knobs(active_blocks=2, block_policy="middle"), r"block_policy 'middle' is not one of prefix, importance, random"),
    (Knobs(max_new_tokens=-1), r"max_new_tokens=-1 is out of range: allowed >= 0"),
])
def test_invalid_knobs_fail_clearly(tiny, knobs, message):
    with pytest.raises(ValueError, match=message):
        tiny.apply_knobs(knobs)
    assert tiny.active_block_indices() == (0, 1, 2, 3)


def test_top_k_on_a_dense_decoder_is_refused():
    from flexvlm_ray.knobs.moe import validate_top_k
    with pytest.raises(ValueError, match="top_k=2 was given but the model has a dense decoder"):
        validate_top_k(top_k=2, num_experts=0)


# -- active blocks -------------------------------------------------------------------------
@pytest.mark.parametrize("policy, n, num, seed, expected", [
    ("prefix", 2, 4, 0, (0, 1)),
    ("prefix", 4, 4, 0, (0, 1, 2, 3)),
    ("random", 2, 4, 0, tuple(sorted(random.Random(0).sample(range(4), 2)))),
    ("random", 3, 16, 5, tuple(sorted(random.Random(5).sample(range(16), 3)))),
    ("importance", 2, 4, 0, (1, 3)),         # scores below: blocks 3 and 1 change their input most
    ("importance", 3, 4, 0, (1, 2, 3)),
])
def test_select_blocks_table(policy, n, num, seed, expected):
    scores = [0.1, 0.5, 0.2, 0.9] if num == 4 else None
    assert select_blocks(active_blocks=n, num_blocks=num, policy=policy, seed=seed,
                         scores=(lambda: scores)) == expected


@pytest.mark.parametrize("policy, n", [(p, n) for p in ("prefix", "importance", "random") for n in (1, 2, 3)])
def test_block_mask_runs_exactly_the_chosen_blocks(tiny, policy, n):
    tiny.apply_knobs(Knobs(active_blocks=n, block_policy=policy))
    chosen = tiny.active_block_indices()
    expected = select_blocks(active_blocks=n, num_blocks=4, policy=policy, seed=0, scores=tiny.block_importance)
    assert chosen == expected and len(chosen) == n
    assert [b for b in tiny.decoder_blocks()] == [tiny.model.blocks[i] for i in chosen]
    calls: Counter = Counter()
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.update([i])) for i, b in enumerate(tiny.model.blocks)]
    _, _, state = run(tiny)
    for _ in range(3):
        tiny.decode_step(state)
    for h in handles:
        h.remove()
    assert dict(calls) == {i: 4 for i in chosen}
    assert set(state.cache.keys) == set(chosen)


def _seed_without_block_zero() -> int:
    return next(s for s in range(100) if 0 not in random.Random(s).sample(range(4), 2))


@pytest.mark.parametrize("policy, n, seed, skips_first", [
    ("random", 2, _seed_without_block_zero(), True), ("random", 3, 0, False),
    ("prefix", 2, 0, False), ("importance", 2, 0, False)])
def test_decode_with_skipped_blocks_matches_uncached_reference(policy, n, seed, skips_first):
    adapter = make_adapter(seed=seed)
    adapter.apply_knobs(Knobs(active_blocks=n, block_policy=policy))
    blocks = adapter.active_block_indices()
    if skips_first:
        assert 0 not in blocks
    prepared, embeds, state = run(adapter)
    for _ in range(5):
        adapter.decode_step(state)
    # reference: the same blocks over the whole growing sequence, no cache
    ids = prepared.inputs["input_ids"]
    embed = adapter.model.decoder.model.embed_tokens
    with torch.inference_mode():
        hidden = embed(ids)
        hidden[0, prepared.inputs["image_positions"]] = embeds[prepared.inputs["feature_index"]]
        reference = []
        for _ in range(6):
            logits = adapter._forward(hidden=hidden, start=0, cache=None, blocks=blocks)
            token = int(torch.argmax(logits))
            reference.append(token)
            hidden = torch.cat([hidden, embed(torch.tensor([[token]]))], dim=1)
    torch.testing.assert_close(state.extras["logits"], logits, rtol=1e-4, atol=1e-4)
    assert state.tokens == reference
    assert state.position == prepared.num_total_tokens + 5


def test_changing_blocks_mid_sequence_is_refused(tiny):
    tiny.apply_knobs(Knobs(active_blocks=2))
    _, _, state = run(tiny)
    tiny.restore_knobs()
    with pytest.raises(RuntimeError, match="active blocks changed during decoding"):
        tiny.decode_step(state)


# -- output length, restore ---------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_forced_decode_length_is_exact(tiny, n):
    _, _, state = run(tiny)
    for _ in range(n - 1):
        tiny.decode_step(state)
    assert len(state.tokens) == n


@pytest.mark.parametrize("knobs", [
    Knobs(top_k=1),
    Knobs(top_k=8, active_blocks=1, block_policy="prefix"),
    Knobs(active_blocks=2, block_policy="random"),
    Knobs(top_k=3, active_blocks=3, block_policy="importance", max_crops=2),
])
def test_restore_gives_identical_logits(knobs):
    fresh = make_adapter()
    _, _, ref = run(fresh)
    fresh.apply_knobs(knobs)
    _, _, changed = run(fresh, knobs)
    assert not torch.equal(changed.extras["logits"], ref.extras["logits"])
    fresh.restore_knobs()
    _, _, again = run(fresh)
    assert torch.equal(again.extras["logits"], ref.extras["logits"])
    assert fresh.knobs == Knobs() and fresh.active_block_indices() == (0, 1, 2, 3)


# -- importance cache -----------------------------------------------------------------------
def test_importance_scores_are_cached_on_disk(tmp_path, monkeypatch):
    import flexvlm_ray.models.flexmoe.config as flexmoe_mod

    monkeypatch.setattr(flexmoe_mod, "ASSETS_TINY", tmp_path / "no-shipped-weights")   # seed-dependent weights
    first = make_adapter()
    first.apply_knobs(Knobs(active_blocks=2, block_policy="importance"))
    assert first.importance_computations == 1
    files = list((tmp_path / "cache" / "importance").glob("*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    first.apply_knobs(Knobs(active_blocks=3, block_policy="importance"))
    assert first.importance_computations == 1          # memoized in the adapter

    second = make_adapter()
    second.apply_knobs(Knobs(active_blocks=2, block_policy="importance"))
    assert second.importance_computations == 0         # read from the file
    assert files[0].stat().st_mtime_ns == mtime
    assert second.block_importance() == first.block_importance()
    first.apply_knobs(Knobs(active_blocks=2, block_policy="importance"))
    assert second.active_block_indices() == first.active_block_indices()

    other_seed = make_adapter(seed=1)                  # another model identity: another file
    other_seed.apply_knobs(Knobs(active_blocks=2, block_policy="importance"))
    assert other_seed.importance_computations == 1
    assert len(list((tmp_path / "cache" / "importance").glob("*.json"))) == 2


def test_importance_scores_are_block_influence(tiny):
    scores = tiny.block_importance()
    assert len(scores) == 4 and all(0.0 <= s <= 2.0 for s in scores)


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return (x * self.factor,)           # a tuple, as transformers' decoder layers may return


def test_block_influence_is_one_minus_cosine_averaged_over_tokens_and_passes():
    # scaling keeps the direction (0), negating reverses it (2); [1, 0] -> [1, 1] on one token of two
    # (1 - cos 45 deg, averaged with 0 over the tokens), in both passes
    turn = torch.nn.Linear(2, 2, bias=False)
    turn.weight.data = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    blocks = [_Scale(3.0), _Scale(-1.0), turn]
    inputs = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])]

    def run(x):
        for block in blocks:
            x = block(x)
            x = x[0] if isinstance(x, tuple) else x

    scores = block_influence(blocks=blocks, samples=inputs, run=run)
    turned = (1.0 - 2 ** -0.5) / 2
    assert scores == pytest.approx([0.0, 2.0, turned])
    with pytest.raises(KeyError):                      # a block that did not run has no score
        block_influence(blocks=blocks, samples=inputs, run=lambda x: blocks[0](x))
    assert all(not b._forward_hooks for b in blocks)   # hooks removed, also after an error


def test_temporary_top_k_restores_each_routers_own_value():
    routers = [torch.nn.Module() for _ in range(2)]
    routers[0].top_k, routers[1].top_k = 1, 3
    with temporary_top_k(routers=routers, top_k=8):
        assert [r.top_k for r in routers] == [8, 8]
    assert [r.top_k for r in routers] == [1, 3]
    with pytest.raises(RuntimeError, match="inside"):
        with temporary_top_k(routers=routers, top_k=2):
            raise RuntimeError("inside")
    assert [r.top_k for r in routers] == [1, 3]


# -- verify-knobs -------------------------------------------------------------------------
def test_verify_knobs_all_rows_pass():
    rows = verify_mod.verify_knobs(family="flexmoe", preset="tiny")
    knobs = {r["knob"] for r in rows}
    assert {"top_k", "active_blocks", "max_crops", "max_new_tokens", "restore"} <= knobs
    assert all(set(r) == {"knob", "setting", "expected", "observed", "ok"} for r in rows)
    assert [r for r in rows if not r["ok"]] == []


def test_verify_knobs_command_exit_codes(monkeypatch):
    runner = CliRunner()
    ok = runner.invoke(verify_mod.verify_knobs_command, ["--model", "flexmoe:tiny"])
    assert ok.exit_code == 0, ok.output
    assert "checks passed" in ok.output and "top_k" in ok.output
    failing = [{"knob": "top_k", "setting": 1, "expected": [1], "observed": [2], "ok": False}]
    monkeypatch.setattr(verify_mod, "verify_knobs", lambda **kwargs: failing)
    bad = runner.invoke(verify_mod.verify_knobs_command, ["--model", "flexmoe:tiny"])
    assert bad.exit_code == 1
    assert "0/1 checks passed" in bad.output
