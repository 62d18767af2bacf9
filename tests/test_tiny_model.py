"""The tiny-model training loop (``flexvlm_ray.train_tiny``) on a toy config: it runs, writes a
folder the adapter loads, and its teacher-forced forward gives the adapter's prefill logits."""
from __future__ import annotations

import math

import torch

from flexvlm_ray.data import DATASETS
from flexvlm_ray.data.shapes import shapes_vocabulary
from flexvlm_ray.eval_tiny import predict
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.flexmoe_config import SPECIAL_TOKENS, UNK_ID, WORDS, FlexMoeConfig
from flexvlm_ray.models.flexmoe_model import load_flexmoe
from flexvlm_ray.train_tiny import batch_loss, make_example, tiny_tokenizer, train

TOY = FlexMoeConfig(name="toy", crop_px=168, vit_patch_px=42, pool_margin=0, max_crops=4, vit_hidden=8,
                    vit_intermediate=16, vit_layers=1, vit_heads=1, vit_feature_layers=(-1, -1), pool_dim=8,
                    pool_heads=1, projector_hidden=16, hidden_size=16, num_blocks=2, num_heads=2, num_experts=4,
                    top_k=2, expert_width=8, vocab_size=512)


def test_training_loop_runs_and_writes_a_loadable_folder(tmp_path):
    report = train(out=tmp_path / "toy", steps=2, seed=0, batch_size=2, config=TOY, pool_size=40, log_every=1)
    assert [h["step"] for h in report["history"]] == [1, 2]
    assert all(math.isfinite(h["ce"]) and math.isfinite(h["aux"]) for h in report["history"])
    model, tokenizer = load_flexmoe(tmp_path / "toy", device="cpu", dtype=torch.float32)
    assert model.config == TOY and tokenizer.get_vocab_size() == 512
    adapter = MODELS.get("flexmoe")(preset=None, path=str(tmp_path / "toy"), dtype="float32", device="cpu",
                                    seed=0, options={})
    assert len(predict(adapter=adapter, samples=DATASETS.get("shapes_vqa").load(split="validation")[:1],
                       knobs=Knobs(max_new_tokens=3))) == 1


def test_training_forward_matches_the_adapter_prefill(tmp_path):
    train(out=tmp_path / "toy", steps=1, seed=0, batch_size=1, config=TOY, pool_size=20)
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
