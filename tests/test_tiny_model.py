"""The tiny-model training loop (``flexvlm_ray.tiny``) on a toy config: it runs, writes a
folder the adapter loads, and its teacher-forced forward gives the adapter's prefill logits."""
from __future__ import annotations

import math

import torch

from flexvlm_ray.data import DATASETS
import numpy as np

from flexvlm_ray.data.shapes import COLORS, sample_scene, shapes_vocabulary
from flexvlm_ray.models.flexmoe.config import PRESETS
from flexvlm_ray.models.flexmoe.preprocess import CLIP_MEAN, CLIP_STD
from flexvlm_ray.tiny.evaluate import predict
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.flexmoe.config import SPECIAL_TOKENS, UNK_ID, WORDS, FlexMoeConfig
from flexvlm_ray.models.flexmoe.model import load_flexmoe
from flexvlm_ray.tiny.examples import (ATTRIBUTES, Draw, example_loader, grounding_targets, make_example,
                                       probe_sample, stack_pixels, tiny_tokenizer)
from flexvlm_ray.tiny.heads import dct_patch_embedding
import pytest

from flexvlm_ray.tiny.train import batch_loss, draw_reduced, reduced_config, train

TOY = FlexMoeConfig(name="toy", crop_px=168, vit_patch_px=42, pool_margin=0, max_crops=4, vit_hidden=8,
                    vit_intermediate=16, vit_layers=1, vit_heads=1, vit_feature_layers=(-1, -1), pool_dim=8,
                    pool_heads=1, projector_hidden=16, hidden_size=16, num_blocks=2, num_heads=2, num_experts=4,
                    top_k=2, expert_width=8, vocab_size=512)


def test_training_loop_runs_and_writes_a_loadable_folder(tmp_path):
    report = train(out=tmp_path / "toy", steps=2, seed=0, batch_size=2, config=TOY, pool_size=40, log_every=1,
                   workers=0, pretrain_steps=2, pretrain_batch=2, diag_every=1, diag_count=4)
    assert [h.get("pretrain_step", h.get("step")) for h in report["history"]] == [1, 2, 1, 2]
    assert all(math.isfinite(h["attr"]) and math.isfinite(h["attr_acc"]) for h in report["history"]
               if "pretrain_step" in h)
    assert all(math.isfinite(h["ce"]) and math.isfinite(h["aux"]) for h in report["history"] if "step" in h)
    assert [d["step"] for d in report["image_reliance"]] == [1, 2]
    assert all(0.0 <= d["first_acc_own"] <= 1.0 and math.isfinite(d["ce_shuffled"]) for d in report["image_reliance"])
    model, tokenizer = load_flexmoe(tmp_path / "toy", device="cpu", dtype=torch.float32)
    assert model.config == TOY and tokenizer.get_vocab_size() == 512
    adapter = MODELS.get("flexmoe")(preset=None, path=str(tmp_path / "toy"), dtype="float32", device="cpu",
                                    seed=0, options={})
    assert len(predict(adapter=adapter, samples=DATASETS.get("shapes_vqa").load(split="validation")[:1],
                       knobs=Knobs(max_new_tokens=3))) == 1


def test_training_forward_matches_the_adapter_prefill(tmp_path):
    train(out=tmp_path / "toy", steps=1, seed=0, batch_size=1, config=TOY, pool_size=20, pretrain_steps=1,
          pretrain_batch=1, workers=0)
    adapter = MODELS.get("flexmoe")(preset=None, path=str(tmp_path / "toy"), dtype="float32", device="cpu",
                                    seed=0, options={})
    vqa = DATASETS.get("shapes_vqa").load(split="validation")[0]
    caption = DATASETS.get("shapes_caption").load(split="validation")[0]
    examples = [make_example(sample=s, config=TOY, tokenizer=adapter.tokenizer, max_crops=crops)
                for s, crops in ((vqa, 4), (caption, 2))]
    captured = []
    handle = adapter.model.decoder.lm_head.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        batch_loss(model=adapter.model, examples=examples)
    handle.remove()
    for row, (sample, crops) in enumerate(((vqa, 4), (caption, 2))):
        prepared = adapter.prepare(sample=sample, knobs=Knobs(max_crops=crops))
        state = adapter.prefill(prepared, adapter.projector(prepared, adapter.vision_encoder(prepared)))
        first_target = captured[0][0] if row == 0 else captured[0][len(examples[0].target_ids)]
        torch.testing.assert_close(first_target, state.extras["logits"], atol=1e-5, rtol=1e-4)


def test_tiny_tokenizer_covers_the_shapes_sets_and_keeps_the_specials():
    tokenizer = tiny_tokenizer(vocab_size=512)
    ids = tokenizer.encode(" ".join(shapes_vocabulary()), add_special_tokens=False).ids
    assert UNK_ID not in ids and tokenizer.get_vocab_size() == 512
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.token_to_id(WORDS[0]) == len(SPECIAL_TOKENS)     # built-in word ids unchanged


def test_token_attribute_labels_point_at_the_shapes_in_the_crops():
    """Every token labelled with a colour shows a pixel of that colour in its region of its crop,
    for the global crop and the tiles, and every shape is labelled on some token of every crop set."""
    config = PRESETS["tiny"]
    tokenizer = tiny_tokenizer(vocab_size=512)
    samples = DATASETS.get("shapes_vqa").load(split="train")
    per_side, step = config.pooled_per_side, config.crop_px // config.pooled_per_side
    distances = []
    for index in range(4):
        scene = sample_scene(dataset="shapes_vqa", split="train", index=index)
        assert len(scene.shapes) == samples[index].meta["num_shapes"]
        for crops in (1, 12):
            example = make_example(sample=samples[index], config=config, tokenizer=tokenizer, max_crops=crops,
                                   scene=scene)
            labels = example.token_labels
            assert labels.shape == (example.pixels.shape[0] * per_side ** 2, len(ATTRIBUTES))
            assert labels[:, ATTRIBUTES.index("shape")].sum() >= len(scene.shapes)
            assert example.background == list(("gray", "white", "beige")).index(scene.background)
            pixels = (example.pixels.transpose(0, 2, 3, 1) * CLIP_STD + CLIP_MEAN) * 255
            for token, column in zip(*np.nonzero(labels)):
                name = ATTRIBUTES[column]
                if name not in COLORS:
                    continue
                crop, row, col = divmod(int(token), per_side ** 2)[0], *divmod(int(token) % per_side ** 2, per_side)
                region = pixels[crop, row * step:(row + 1) * step, col * step:(col + 1) * step]
                distances.append(np.abs(region - np.array(COLORS[name])).sum(-1).min())
    # a label may sit on a token whose share of a shape at the region's edge is blurred by the resize
    assert len(distances) > 50 and np.mean(np.array(distances) < 60) >= 0.97


def test_dct_patch_embedding_filters_are_orthonormal_up_to_scale():
    weight = dct_patch_embedding(out_channels=64, patch=42).reshape(64, -1).double()
    gram = weight @ weight.T
    torch.testing.assert_close(gram, torch.eye(64, dtype=torch.float64) * gram[0, 0], atol=1e-6, rtol=0)
    first = weight[0].reshape(3, 42, 42)                 # the red channel's mean
    assert float(first[0].std()) < 1e-9 and float(first[0].mean()) > 0 and float(first[1:].abs().max()) == 0


def test_grounding_targets_follow_the_scene():
    tokenizer = tiny_tokenizer(vocab_size=512)
    samples = DATASETS.get("shapes_vqa").load(split="train")
    rng = np.random.default_rng(0)
    answers = []
    for index in range(40):
        scene = sample_scene(dataset="shapes_vqa", split="train", index=index)
        probe = probe_sample(sample=samples[index], scene=scene, rng=rng)
        answers.append(probe.meta["answer"])
        words = probe.prompt.rstrip("?").split()[3:]           # "is there a[n]" then the attribute words
        ids = tokenizer.encode(probe.prompt, add_special_tokens=False).ids
        targets = grounding_targets(ids=ids, scene=scene, tokenizer=tokenizer)
        colour = next((w for w in words if w in COLORS), None)
        kind = next((w for w in words if w in ("circle", "square", "triangle")), None)
        shows = any((colour is None or s.color == colour) and (kind is None or s.kind == kind) for s in scene.shapes)
        assert (probe.meta["answer"] == "yes") == shows
        assert targets[-1][1] == float(shows)                  # the last attribute word asks the whole question
        hits = [s for s in scene.shapes if (colour is None or s.color == colour) and (kind is None or s.kind == kind)]
        assert targets[-1][4] == len(hits)
        if kind is not None and len({s.color for s in hits}) == 1:
            assert targets[-1][2] == list(COLORS).index(hits[0].color)
        assert [tokenizer.id_to_token(ids[t[0]]) for t in targets] == [w for w in words if w != "shape"]
    assert 10 <= answers.count("no") <= 30                     # balanced: the prior answer is weak
    ids = tokenizer.encode("what color is the small circle?", add_special_tokens=False).ids
    scene = sample_scene(dataset="shapes_vqa", split="train", index=0)
    small_circle = any(s.small and s.kind == "circle" for s in scene.shapes)
    (position, shown, *_), = grounding_targets(ids=ids, scene=scene, tokenizer=tokenizer)
    assert (position, shown) == (ids.index(tokenizer.token_to_id("circle")), float(small_circle))


def test_example_loader_gives_the_same_batches_in_worker_processes():
    """The draws fix the examples: built in this process or in two spawned workers, the batches come
    back in draw order with identical pixels, ids and targets (a probe draw included)."""
    draws = [[Draw(name="shapes_vqa", index=3, max_crops=2, probe_seed=None, forms=(0, 1, 2)),
              Draw(name="shapes_caption", index=5, max_crops=4, probe_seed=11, forms=(0,))],
             [Draw(name="shapes_count", index=7, max_crops=1, probe_seed=None, forms=(0, 1, 2))],
             [Draw(name="shapes_mc", index=2, max_crops=3, probe_seed=None, forms=(0, 1, 2))]]
    local = list(example_loader(draws=draws, config=TOY, ground_answers=True, workers=0))
    spawned = list(example_loader(draws=draws, config=TOY, ground_answers=True, workers=2))
    assert [len(b) for b in local] == [len(b) for b in spawned] == [2, 1, 1]
    for a, b in zip((e for batch in local for e in batch), (e for batch in spawned for e in batch)):
        assert torch.equal(a.pixels, b.pixels) and a.input_ids == b.input_ids and a.target_ids == b.target_ids
        assert a.grounding == b.grounding and np.array_equal(a.token_labels, b.token_labels)
    assert local[0][1].input_ids[-6:] != make_example(
        sample=DATASETS.get("shapes_caption").load(split="train")[5], config=TOY,
        tokenizer=tiny_tokenizer(vocab_size=512), max_crops=4).input_ids[-6:]      # the probe replaced the prompt
    assert stack_pixels(examples=local[0], device=torch.device("cpu")).shape[0] == sum(
        e.pixels.shape[0] for e in local[0])


def test_phase1_cache_loads_safely_and_gives_the_same_weights(tmp_path):
    """A second run with the same seed and settings takes phase 1 from the cache (read with
    weights_only=True: tensors and plain data only) and ends with the same weights."""
    from safetensors.torch import load_file

    common = dict(steps=2, seed=1, batch_size=2, config=TOY, pool_size=40, log_every=1, workers=0,
                  pretrain_steps=2, pretrain_batch=2, phase1_cache=tmp_path / "phase1.pt")
    first = train(out=tmp_path / "a", **common)
    second = train(out=tmp_path / "b", **common)
    assert (first["phase1_loaded_from_cache"], second["phase1_loaded_from_cache"]) == (False, True)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.load(tmp_path / "phase1.pt", weights_only=True)   # raises if the file held anything but tensors and data


TOY3 = FlexMoeConfig(**{**TOY.to_dict(), "name": "toy3", "num_blocks": 3})


def test_reduced_config_runs_a_prefix_with_fewer_experts_and_restores_the_model():
    """Inside ``reduced_config`` the decoder runs the first 2 of 3 blocks with top_k 1: two blocks' router
    logits; afterwards every block and top_k is back, and a full forward records all three (transformers
    installs its output hooks on the first forward, here the reduced one)."""
    from flexvlm_ray.models.flexmoe.model import build_flexmoe

    model = build_flexmoe(TOY3, device="cpu", dtype=torch.float32, seed=0)
    decoder = model.decoder.model
    hidden = torch.randn(1, 5, TOY3.hidden_size)
    layers = list(decoder.layers)
    with reduced_config(model=model, blocks=2, top_k=1):
        out = decoder(inputs_embeds=hidden, output_router_logits=True)
        assert len(out.router_logits) == 2 and [layer.mlp.gate.top_k for layer in layers] == [1, 1, 1]
    assert list(decoder.layers) == layers and [layer.mlp.gate.top_k for layer in layers] == [2, 2, 2]
    assert decoder.config.num_hidden_layers == 3
    full = decoder(inputs_embeds=hidden, output_router_logits=True)
    assert len(full.router_logits) == 3
    with pytest.raises(ValueError, match="1 <= blocks <= 3"):
        with reduced_config(model=model, blocks=4, top_k=1):
            pass


@pytest.mark.parametrize("elastic, expected_none", [(0.0, 200), (1.0, 0)])
def test_reduced_draws_cover_every_prefix_and_top_k(elastic, expected_none):
    rng = np.random.default_rng(0)
    draws = [draw_reduced(rng=rng, elastic=elastic, config=TOY3) for _ in range(200)]
    assert sum(d is None for d in draws) == expected_none
    if elastic:
        assert {d for d in draws} == {(b, k) for b in (1, 2, 3) for k in (1, 2)}


def test_elastic_training_trains_reduced_configurations_and_leaves_elastic_0_unchanged(tmp_path):
    """elastic 1.0: every phase-2 step after the curriculum is a reduced configuration, and the weights differ
    from the full-configuration run; elastic 0 gives the same weights as a run that never heard of it."""
    from safetensors.torch import load_file

    common = dict(steps=3, seed=0, batch_size=2, config=TOY3, pool_size=40, log_every=1, workers=0,
                  pretrain_steps=1, pretrain_batch=2, early_crops=(0.0, 1))
    plain = train(out=tmp_path / "plain", **common)
    zero = train(out=tmp_path / "zero", elastic=0.0, **common)
    elastic = train(out=tmp_path / "elastic", elastic=1.0, **common)
    assert (plain["reduced_steps"], zero["reduced_steps"], elastic["reduced_steps"]) == (0, 0, 3)
    a, b, c = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", "zero", "elastic"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="elastic is the share"):
        train(out=tmp_path / "bad", elastic=1.5, **common)
