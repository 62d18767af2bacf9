"""The flexmoe family on CPU: presets, Molmo-style crops and token counts, stages, save/load,
parameter counts and analytic FLOPs."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from flexvlm_ray.data.base import Sample
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.flexmoe.adapter import FlexMoeAdapter, flexmoe_param_counts
from flexvlm_ray.models.flexmoe.config import (IM_COL_ID, IMG_ID, PRESETS, FlexMoeConfig,
                                               scaled_feature_layers)
from flexvlm_ray.models.flexmoe.flops import flexmoe_flops
from flexvlm_ray.models.flexmoe.model import FlexMoeModel, default_dtype, save_flexmoe
from flexvlm_ray.models.flexmoe.preprocess import layout_image, normalize_crops


def make_adapter(**kwargs) -> FlexMoeAdapter:
    args = dict(preset="tiny", path=None, dtype="float32", device="cpu", seed=0, options={})
    args.update(kwargs)
    return MODELS.get("flexmoe")(**args)


def sample(width: int = 640, height: int = 512, prompt: str = "what color is the car ?") -> Sample:
    return Sample(sample_id="s", image=Image.new("RGB", (width, height), (90, 140, 30)), prompt=prompt)


def run(adapter: FlexMoeAdapter, smp: Sample, knobs: Knobs = Knobs()):
    prepared = adapter.prepare(sample=smp, knobs=knobs)
    embeds = adapter.projector(prepared, adapter.vision_encoder(prepared))
    return prepared, adapter.prefill(prepared, embeds)


@pytest.fixture(scope="module")
def tiny() -> FlexMoeAdapter:
    return make_adapter()


# -- presets ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset, blocks, experts, top_k, per_crop, hidden, vocab", [
    ("tiny", 4, 8, 2, 16, 128, 512),
    ("molmoe-1b", 16, 64, 8, 144, 2048, 50304),
])
def test_describe_presets_without_building(preset, blocks, experts, top_k, per_crop, hidden, vocab):
    info = FlexMoeAdapter.describe(preset=preset, path=None, options={})
    assert (info.family, info.preset, info.num_blocks, info.num_experts, info.default_top_k,
            info.vision_tokens_per_crop, info.hidden_size, info.vocab_size, info.max_crops_limit) == (
        "flexmoe", preset, blocks, experts, top_k, per_crop, hidden, vocab, 12)


def test_unknown_preset_and_option_fail_clearly():
    with pytest.raises(ValueError, match="Unknown preset 'big'.*molmoe-1b, tiny"):
        FlexMoeAdapter.describe(preset="big", path=None, options={})
    with pytest.raises(ValueError, match="unknown options for family 'flexmoe'"):
        FlexMoeAdapter.describe(preset="tiny", path=None, options={"colour": 1})
    with pytest.raises(ValueError, match="experts_implementation 'fast'"):
        FlexMoeAdapter.describe(preset="tiny", path=None, options={"experts_implementation": "fast"})


def test_molmoe_preset_shape():
    c = PRESETS["molmoe-1b"]
    assert (c.vit_patch_px, c.crop_px, c.patches_per_side, c.vit_layers, c.vit_hidden) == (14, 336, 24, 23, 1024)
    assert c.vit_feature_layers == (-2, -9) and not c.vit_post_layernorm
    assert (c.num_blocks, c.hidden_size, c.num_heads, c.num_experts, c.top_k, c.expert_width) == (
        16, 2048, 16, 64, 8, 1024)
    assert (c.pool_dim, c.projector_hidden, c.vocab_size, c.extra_embeddings) == (1024, 1024, 50304, 128)
    assert (c.pad_embed, c.image_embed_mode, c.preprocess) == (True, "add", "molmo")


@pytest.mark.parametrize("layers, expected", [(24, (-2, -9)), (3, (-1, -2)), (12, (-1, -5)), (1, (-1, -1))])
def test_scaled_feature_layers(layers, expected):
    assert scaled_feature_layers(num_layers=layers) == expected


def test_molmoe_param_counts_on_meta_device():
    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = FlexMoeModel(PRESETS["molmoe-1b"])
    counts = flexmoe_param_counts(model=model, top_k=8, active_blocks=range(16))
    total = sum(p.numel() for p in model.parameters())
    assert counts["vision_encoder"] + counts["projector"] + counts["llm"] == total
    assert 7.0e9 < total < 7.5e9                       # MolmoE-1B: 7.2B total
    assert 1.2e9 < counts["llm_active"] < 1.4e9        # OLMoE-1B-7B: ~1.3B active
    assert 2.85e8 < counts["vision_encoder"] < 2.95e8  # CLIP ViT-L/14-336 without its last layer: ~291M


# -- crops and token counts ----------------------------------------------------------------
@pytest.mark.parametrize("width, height, max_crops, tiling, crops, tiny_tokens, molmoe_tokens", [
    (640, 512, 12, (2, 3), 7, 7 * 16, 144 + 20 * 28),     # VQA v2 typical: 7 crops
    (612, 612, 12, (3, 3), 10, 10 * 16, 144 + 28 * 28),   # 10 crops
    (336, 336, 12, (1, 1), 2, 2 * 16, 144 + 12 * 12),
    (336 * 4, 336, 12, (1, 6), 7, 7 * 16, 144 + 12 * 52),    # (1344-112)/224 = 5.5 -> 6 tiles
    (640, 512, 1, (1, 1), 2, 2 * 16, 144 + 144),
    (640, 512, 4, (2, 2), 5, 5 * 16, 144 + 20 * 20),
])
def test_crops_to_token_counts(width, height, max_crops, tiling, crops, tiny_tokens, molmoe_tokens):
    image = Image.new("RGB", (width, height))
    for preset, tokens in (("tiny", tiny_tokens), ("molmoe-1b", molmoe_tokens)):
        layout = layout_image(image=image, config=PRESETS[preset], max_crops=max_crops)
        assert layout.tiling == tiling
        assert layout.num_crops == crops
        assert len(layout.feature_index) == tokens
        assert len(set(layout.feature_index.tolist())) == tokens   # no feature placed twice


def test_prepare_counts_match_the_sequence(tiny):
    smp = sample(640, 512, "what color is the car ?")
    prepared = tiny.prepare(sample=smp, knobs=Knobs())
    ids = prepared.inputs["input_ids"][0]
    assert prepared.num_crops == 7
    assert prepared.num_total_tokens == ids.numel()
    assert prepared.num_vision_tokens == int((ids == IMG_ID).sum()) == 112
    assert prepared.num_language_tokens == prepared.num_total_tokens - prepared.num_vision_tokens
    # [BOS], two start/end pairs, 4 global rows + 8 stitched rows (2 x 4 pooled) of column tokens, 6 words
    assert prepared.num_language_tokens == 1 + 4 + 4 + 8 + 6
    assert int((ids == IM_COL_ID).sum()) == 12
    assert prepared.inputs["pixel_values"].shape == (7, 3, 336, 336)


def test_max_crops_out_of_range(tiny):
    with pytest.raises(ValueError, match=r"max_crops=13 is out of range: allowed 1\.\.12"):
        tiny.prepare(sample=sample(), knobs=Knobs(max_crops=13))
    with pytest.raises(ValueError, match=r"max_crops=0"):
        tiny.apply_knobs(Knobs(max_crops=0))


def test_stages_shapes_and_state(tiny):
    prepared = tiny.prepare(sample=sample(), knobs=Knobs())
    features = tiny.vision_encoder(prepared)
    assert features.shape == (7, 64, 2 * 64)
    embeds = tiny.projector(prepared, features)
    assert embeds.shape == (7 * 16, 128)
    state = tiny.prefill(prepared, embeds)
    assert state.position == prepared.num_total_tokens and len(state.tokens) == 1
    token = tiny.decode_step(state)
    assert state.tokens[-1] == token and state.position == prepared.num_total_tokens + 1
    assert isinstance(tiny.decode_text(state.tokens), str)
    assert tiny.eos_token_id == 3


def test_image_features_reach_the_decoder(tiny):
    _, a = run(tiny, Sample(sample_id="a", image=Image.new("RGB", (336, 336), (255, 0, 0)), prompt="what"))
    _, b = run(tiny, Sample(sample_id="b", image=Image.new("RGB", (336, 336), (0, 0, 255)), prompt="what"))
    assert not torch.equal(a.extras["logits"], b.extras["logits"])


def test_block_parts_and_decoder_blocks(tiny):
    blocks = tiny.decoder_blocks()
    assert len(blocks) == 4
    parts = tiny.block_parts(blocks[0])
    assert parts["attention"] is blocks[0].self_attn and parts["ffn"] is blocks[0].mlp


def test_param_counts_sum_to_total(tiny):
    counts = tiny.param_counts()
    total = sum(p.numel() for p in tiny.model.parameters())
    assert counts["vision_encoder"] + counts["projector"] + counts["llm"] == total
    c = PRESETS["tiny"]
    experts_per_block = c.num_experts * 3 * c.hidden_size * c.expert_width
    assert counts["llm"] - counts["llm_active"] == c.num_blocks * experts_per_block * (c.num_experts - c.top_k) // c.num_experts


def test_dtype_bfloat16_runs_on_cpu():
    adapter = make_adapter(dtype="bfloat16")
    assert next(adapter.model.parameters()).dtype == torch.bfloat16
    _, state = run(adapter, sample(336, 336))
    adapter.decode_step(state)
    assert len(state.tokens) == 2


@pytest.mark.parametrize("experts", ["eager", "batched_mm", "grouped_mm"])
def test_experts_implementations_agree(tiny, experts):
    other = make_adapter(options={"experts_implementation": experts})
    assert other.experts_implementation == experts
    _, ref = run(tiny, sample(336, 336))
    _, got = run(other, sample(336, 336))
    torch.testing.assert_close(got.extras["logits"], ref.extras["logits"], rtol=1e-4, atol=1e-4)


def test_eager_attention_agrees_with_sdpa(tiny):
    other = make_adapter(options={"attn_implementation": "eager"})
    _, ref = run(tiny, sample(336, 336))
    _, got = run(other, sample(336, 336))
    torch.testing.assert_close(got.extras["logits"], ref.extras["logits"], rtol=1e-4, atol=1e-4)
    for _ in range(3):
        assert tiny.decode_step(ref) == other.decode_step(got)


def test_save_and_load_from_path(tiny, tmp_path):
    save_flexmoe(model=tiny.model, tokenizer=tiny.tokenizer, directory=tmp_path / "m")
    info = FlexMoeAdapter.describe(preset=None, path=str(tmp_path / "m"), options={})
    assert info.num_blocks == 4 and info.num_experts == 8
    loaded = make_adapter(preset=None, path=str(tmp_path / "m"), seed=99)
    _, ref = run(tiny, sample())
    _, got = run(loaded, sample())
    assert torch.equal(got.extras["logits"], ref.extras["logits"])


def test_missing_path_names_the_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        make_adapter(preset=None, path=str(missing))


def test_same_seed_same_weights_other_seed_differs(tmp_path, monkeypatch):
    import flexvlm_ray.models.flexmoe.config as flexmoe_mod

    monkeypatch.setattr(flexmoe_mod, "ASSETS_TINY", tmp_path / "no-shipped-weights")   # random weights
    a, b, c = make_adapter(seed=3), make_adapter(seed=3), make_adapter(seed=4)
    wa, wb, wc = (m.model.decoder.lm_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


# -- FLOPs ---------------------------------------------------------------------------------
MICRO = FlexMoeConfig(name="micro", crop_px=8, vit_patch_px=4, pool_margin=0, vit_hidden=2, vit_intermediate=4,
                      vit_layers=1, vit_heads=1, vit_feature_layers=(-1, -1), pool_dim=2, pool_heads=1,
                      projector_hidden=3, hidden_size=4, num_blocks=2, num_heads=1, num_experts=4, top_k=2,
                      expert_width=2, vocab_size=300)

# Hand-computed for MICRO (2 FLOPs per multiply-add):
# vision per crop: patches 4, N = 5 tokens, d 2, f 4, pixels per patch 3*4*4 = 48
#   embed 2*4*48*2 = 768; layer qkvo 8*5*2*2 = 160 + attn 4*25*2 = 200 + mlp 4*5*2*4 = 160 -> 1288
# projector per pooled token (1 per crop): Din 4, Dp 2, P 3, H 4
#   q 2*4*2 = 16, k+v 16*4*2 = 128, attn 16*2 = 32, o 2*2*2 = 8, w1+w3 4*2*3 = 24, w2 2*3*4 = 24 -> 232
# decoder per token and block: qkvo 8*16 = 128, router 2*4*4 = 32, experts k*6*4*2 = 48k
#   k=2: 256, k=1: 208; attention per key 4*4 = 16; lm_head 2*4*300 = 2400
# prefill T=5: keys 1+..+5 = 15; decode n=3: 2 steps at 6 and 7 keys = 13
FLOPS_TABLE = [
    # crops, T, n, top_k, blocks, vision, projector, prefill, decode
    (3, 5, 3, 2, 2, 3 * 1288, 3 * 232, 5 * 512 + 2 * 16 * 15 + 2400, 2 * (512 + 2400) + 2 * 16 * 13),
    (3, 5, 3, 1, 1, 3 * 1288, 3 * 232, 5 * 208 + 16 * 15 + 2400, 2 * (208 + 2400) + 16 * 13),
    (1, 5, 1, 2, 2, 1288, 232, 5440, 0),
    (2, 4, 2, 4, 2, 2 * 1288, 2 * 232, 4 * 2 * 352 + 2 * 16 * 10 + 2400, 2 * 352 + 2400 + 2 * 16 * 5),
]


@pytest.mark.parametrize("crops, t, n, top_k, blocks, vision, projector, prefill, decode", FLOPS_TABLE)
def test_flops_hand_computed(crops, t, n, top_k, blocks, vision, projector, prefill, decode):
    got = flexmoe_flops(config=MICRO, num_crops=crops, num_prompt_tokens=t, num_output_tokens=n, top_k=top_k,
                        num_active_blocks=blocks)
    assert got == {"vision": vision, "projector": projector, "llm_prefill": prefill, "llm_decode": decode}


def test_adapter_flops_follow_knobs(tiny):
    prepared = tiny.prepare(sample=sample(), knobs=Knobs())
    full = tiny.flops(prepared=prepared, num_output_tokens=8, knobs=Knobs())
    small = tiny.flops(prepared=prepared, num_output_tokens=8, knobs=Knobs(top_k=1, active_blocks=2))
    assert full["vision"] == small["vision"] and full["projector"] == small["projector"]
    assert small["llm_prefill"] < full["llm_prefill"] and small["llm_decode"] < full["llm_decode"]
    fewer = tiny.prepare(sample=sample(), knobs=Knobs(max_crops=1))
    assert tiny.flops(prepared=fewer, num_output_tokens=8, knobs=Knobs())["vision"] == full["vision"] * 2 / 7


def test_tiny_preset_loads_shipped_assets_when_present(tmp_path, monkeypatch):
    import flexvlm_ray.models.flexmoe.config as flexmoe_mod

    trained = make_adapter(seed=5)
    save_flexmoe(model=trained.model, tokenizer=trained.tokenizer, directory=tmp_path / "assets" / "tiny")
    monkeypatch.setattr(flexmoe_mod, "ASSETS_TINY", tmp_path / "assets" / "tiny")
    shipped = make_adapter(seed=0)
    assert shipped.weights_dir == tmp_path / "assets" / "tiny"
    assert torch.equal(shipped.model.decoder.lm_head.weight, trained.model.decoder.lm_head.weight)
    assert shipped.identity()["weights"].startswith("sha256:")


@pytest.mark.parametrize("max_crops", [1, 5, 12])
def test_uint8_crops_normalized_later_are_bit_identical(max_crops):
    """layout_image(normalize=False) keeps exact uint8 crops; normalize_crops gives the very floats
    that layout_image computes, so training can move 4x fewer bytes and normalize on the device."""
    from flexvlm_ray.data import DATASETS
    image = DATASETS.get("shapes_vqa").load(split="validation")[3].image
    config = PRESETS["tiny"]
    ref = layout_image(image=image, config=config, max_crops=max_crops)
    raw = layout_image(image=image, config=config, max_crops=max_crops, normalize=False)
    assert raw.pixels.dtype.name == "uint8" and raw.pixels.shape == ref.pixels.shape
    assert (raw.feature_index == ref.feature_index).all() and raw.image_tokens == ref.image_tokens
    assert torch.equal(normalize_crops(torch.from_numpy(raw.pixels)), torch.from_numpy(ref.pixels))
