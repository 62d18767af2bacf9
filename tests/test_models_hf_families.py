"""Native transformers VLM families on CPU (``qwen3_vl_moe:tiny``): stages through the engine,
vision tokens from ``max_pixels``, top_k routing, active blocks with a consistent KV cache,
restore, forced output length, spec validation and ``verify_knobs``."""
from __future__ import annotations

import pytest
import torch
from model_support import decode_counting_block_calls, routed_experts_per_token, run_stages, sample

from flexvlm_ray.data.base import Sample
from flexvlm_ray.commands.verify_knobs import verify_knobs
from flexvlm_ray.measure.engine import measure_pass
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.qwen3_vl_moe.adapter import Qwen3VLMoeAdapter
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import SpecError, load_spec_text

SPEC = """
name: q
experiment: quickstart
model: {family: qwen3_vl_moe, preset: tiny}
datasets: [{name: probe_grid, num_samples: 1}]
knobs: {top_k: [1, 2], active_blocks: [2, 4], max_new_tokens: 5}
"""


def make(**options) -> Qwen3VLMoeAdapter:
    return MODELS.get("qwen3_vl_moe")(preset="tiny", path=None, dtype="float32", device="cpu", seed=0,
                                      options=options)


def run(adapter, smp: Sample, knobs: Knobs = Knobs()):
    return run_stages(adapter, smp, knobs)


@pytest.fixture(scope="module")
def tiny() -> Qwen3VLMoeAdapter:
    return make()


def test_describe_without_building_and_bad_inputs(tmp_path):
    info = Qwen3VLMoeAdapter.describe(preset="tiny", path=None, options={"max_pixels": 4096})
    assert (info.family, info.num_blocks, info.num_experts, info.default_top_k, info.max_crops_limit,
            info.hidden_size, info.vocab_size) == ("qwen3_vl_moe", 4, 8, 2, 0, 64, 512)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        Qwen3VLMoeAdapter.describe(preset=None, path=str(tmp_path / "missing"), options={})
    with pytest.raises(ValueError, match="unknown options for family 'qwen3_vl_moe'"):
        Qwen3VLMoeAdapter.describe(preset="tiny", path=None, options={"max_crops": 3})
    with pytest.raises(ValueError, match="Unknown preset 'big'"):
        Qwen3VLMoeAdapter.describe(preset="big", path=None, options={})


def test_matches_the_models_own_forward_and_generate(tiny):
    prepared, state = run(tiny, sample())
    inputs = prepared.inputs
    kwargs = dict(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                  image_grid_thw=inputs["image_grid_thw"],
                  mm_token_type_ids=(inputs["input_ids"] == tiny.config.image_token_id).int())
    with torch.inference_mode():
        logits = tiny.model(**kwargs).logits[0, -1]
        generated = tiny.model.generate(**kwargs, max_new_tokens=4, do_sample=False)
    assert torch.allclose(logits, state.extras["logits"], atol=1e-5)
    for _ in range(3):
        tiny.decode_step(state)
    assert state.tokens == generated[0, prepared.num_total_tokens:].tolist()


def test_engine_pass_counts_and_forced_length(tiny):
    unit = expand(load_spec_text(SPEC, source="x"))[0]
    row = measure_pass(adapter=tiny, sample=sample(), unit=unit)
    tiny.restore_knobs()
    # 640x480 under 16384 pixels: smart_resize gives a 6x8 patch grid (96x128 px), 12 merged tokens
    assert row["num_vision_tokens"] == 12 and row["num_output_tokens"] == 5
    assert row["num_total_tokens"] == row["num_vision_tokens"] + row["num_language_tokens"]


def test_max_pixels_sets_the_vision_token_count():
    counts = {}
    for pixels in (4096, 16384, 65536):
        adapter = make(max_pixels=pixels)
        prepared = adapter.prepare(sample=sample(), knobs=Knobs())
        t, h, w = prepared.extras["image_grid_thw"]
        assert prepared.num_vision_tokens == t * h * w // 4 == int((prepared.inputs["input_ids"] == 6).sum())
        assert h * w * 16 * 16 <= pixels
        counts[pixels] = prepared.num_vision_tokens
    assert counts[4096] < counts[16384] < counts[65536]


def test_top_k_sets_distinct_routed_experts_and_restore_is_exact(tiny):
    tiny.restore_knobs()
    _, fresh = run(tiny, sample())
    for k in (1, 3, 8):
        seen, changed = routed_experts_per_token(tiny, knobs=Knobs(top_k=k), run=lambda: run(tiny, sample()))
        assert sorted(seen) == [k]
        assert not torch.equal(changed.extras["logits"], fresh.extras["logits"])
    tiny.restore_knobs()
    _, restored = run(tiny, sample())
    assert torch.equal(restored.extras["logits"], fresh.extras["logits"])


@pytest.mark.parametrize("policy", ["prefix", "random"])
def test_active_blocks_run_exactly_the_chosen_blocks_with_a_consistent_cache(tiny, policy):
    chosen, prepared, state, calls = decode_counting_block_calls(
        tiny, blocks=list(tiny.text_model.layers), knobs=Knobs(active_blocks=2, block_policy=policy),
        run=lambda: run(tiny, sample()))
    assert len(chosen) == 2 and dict(calls) == {i: 4 for i in chosen}
    if policy == "prefix":
        assert chosen == (0, 1)
    # recompute the last step without a cache: prompt + generated tokens in one forward
    inputs = prepared.inputs
    with torch.inference_mode():
        embeds = tiny.projector(prepared, tiny.vision_encoder(prepared))
        ids = torch.cat([inputs["input_ids"], torch.tensor([state.tokens[:-1]])], dim=1)
        hidden = tiny.text_model.embed_tokens(ids)
        hidden[0, : prepared.num_total_tokens][inputs["image_mask"]] = embeds["image"]
        n = len(state.tokens) - 1
        extra = torch.arange(prepared.num_total_tokens, prepared.num_total_tokens + n) + inputs["rope_delta"]
        positions = torch.cat([inputs["position_ids"], extra.view(1, 1, -1).expand(3, 1, -1)], dim=2)
        mask = torch.cat([inputs["image_mask"], torch.zeros(n, dtype=torch.bool)])
        logits = tiny._forward(hidden=hidden, position_ids=positions, cache=None,
                               deepstack=(mask, embeds["deepstack"]))
    tiny.restore_knobs()
    assert torch.allclose(logits, state.extras["logits"], atol=1e-5)
    assert int(torch.argmax(logits)) == state.tokens[-1]


def test_spec_validation_rejects_max_crops():
    with pytest.raises(SpecError, match="knobs.max_crops.*no crop knob"):
        load_spec_text(SPEC.replace("max_new_tokens: 5", "max_new_tokens: 5, max_crops: [2]"), source="x")
    with pytest.raises(SpecError, match="knobs.top_k.*above the model's 8 experts"):
        load_spec_text(SPEC.replace("top_k: [1, 2]", "top_k: [9]"), source="x")


def test_verify_knobs_passes_on_tiny():
    rows = verify_knobs(family="qwen3_vl_moe", preset="tiny")
    assert {r["knob"] for r in rows} >= {"top_k", "active_blocks", "max_new_tokens", "restore"}
    assert [r for r in rows if not r["ok"]] == []


# -- structural discovery ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "flexmoe", "molmo2"])
def test_discovery_finds_the_adapters_routers_blocks_and_vision(family):
    from flexvlm_ray.models.discover import discover_structure

    adapter = MODELS.get(family)(preset="tiny", path=None, dtype="float32", device="cpu", seed=0, options={})
    found = discover_structure(adapter.model)
    assert [id(m) for m in found.routers] == [id(m) for m in adapter.moe_routers()]
    assert [id(b) for b in found.blocks] == [id(b) for b in adapter.decoder_blocks()]
    assert found.vision_name in ("model.visual", "vision", "model.vision_tower")


def test_discovery_on_a_dense_model_ignores_the_larger_vision_list():
    from torch import nn

    from flexvlm_ray.models.discover import discover_structure

    model = nn.Module()
    model.vision_backbone = nn.Module()
    model.vision_backbone.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(6)])
    model.transformer = nn.Module()
    model.transformer.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    found = discover_structure(model)
    assert (found.vision_name, found.blocks_name, found.routers) == ("vision_backbone", "transformer.blocks", [])
    with pytest.raises(ValueError, match="no nn.ModuleList of decoder blocks"):
        discover_structure(nn.Linear(2, 2))


# -- analytic FLOPs ----------------------------------------------------------------------------
# tiny: vision d=32 f=64 depth 2, patch 16, temporal patch 2, merge 2, out 64, one DeepStack merger;
# decoder H=64, 4 heads + 2 kv heads of 16, 8 experts of width 32, vocab 512, 4 sparse blocks.
# 640x480 under 16384 px: grid (1, 6, 8), N = 48 patches, 12 merged tokens, T = 12 + 2 + 6 = 20 tokens.
#   vision    = 2*48*(3*2*16*16)*32 + 2*(8*48*32^2 + 4*1*48^2*32 + 4*48*32*64)
#             = 4_718_592 + 2*(393_216 + 294_912 + 393_216)                      = 6_881_280
#   projector = 2 mergers * 12 * (2*128^2 + 2*128*64)                            = 1_179_648
#   per token and block: 4*64*16*(4+2) + 2*64*8 + k*6*64*32 = 24_576 + 1_024 + k*12_288
#                        (k=2: 50_176; k=1: 37_888); attention 4*4*16 = 256 per key
#   prefill(k=2, 4 blocks) = 20*4*50_176 + 4*256*(20*21/2) + 2*64*512
#                          = 4_014_080 + 215_040 + 65_536                        = 4_294_656
#   decode (5 tokens: 4 steps at 21..24 keys) = 4*(4*50_176 + 65_536) + 4*256*90 = 1_157_120
#   prefill(k=1, blocks 0,1) = 20*2*37_888 + 2*256*210 + 65_536                  = 1_688_576
#   decode (k=1, blocks 0,1, 3 tokens: 2 steps at 21, 22 keys) = 2*(2*37_888 + 65_536) + 2*256*43
#                          = 282_624 + 22_016                                   = 304_640
@pytest.mark.parametrize("knobs, new_tokens, expected", [
    (Knobs(), 5, {"vision": 6_881_280, "projector": 1_179_648, "llm_prefill": 4_294_656, "llm_decode": 1_157_120}),
    (Knobs(top_k=1, active_blocks=2), 3,
     {"vision": 6_881_280, "projector": 1_179_648, "llm_prefill": 1_688_576, "llm_decode": 304_640}),
])
def test_analytic_flops_match_the_hand_computed_table(tiny, knobs, new_tokens, expected):
    tiny.apply_knobs(knobs)
    try:
        prepared = tiny.prepare(sample=sample(), knobs=knobs)
        assert (prepared.extras["image_grid_thw"], prepared.num_total_tokens) == ([1, 6, 8], 20)
        assert tiny.flops(prepared=prepared, num_output_tokens=new_tokens, knobs=knobs) == expected
    finally:
        tiny.restore_knobs()


def test_flops_sparse_rule_matches_the_built_model_and_dense_blocks_count_their_mlp():
    from flexvlm_ray.models.qwen3_vl_moe.adapter import tiny_config
    from flexvlm_ray.models.qwen3_vl_moe.flops import block_token_flops, is_sparse

    config = tiny_config()
    config.text_config.mlp_only_layers = [1]
    from transformers import Qwen3VLMoeForConditionalGeneration
    model = Qwen3VLMoeForConditionalGeneration(config)
    text = config.text_config
    built = [hasattr(layer.mlp, "gate") for layer in model.model.language_model.layers]
    assert built == [is_sparse(text=text, index=i) for i in range(4)] == [True, False, True, True]
    # dense block 1: 24_576 + 6*64*128 (intermediate 128), no router, top_k irrelevant
    assert block_token_flops(text=text, index=1, top_k=2) == block_token_flops(text=text, index=1, top_k=8) == 73_728


def test_engine_rows_carry_the_analytic_flops(tiny):
    unit = expand(load_spec_text(SPEC, source="x"))[0]
    row = measure_pass(adapter=tiny, sample=sample(), unit=unit)
    tiny.restore_knobs()
    assert row["flops_vision_analytic"] == 6_881_280 and row["flops_projector_analytic"] == 1_179_648
    # the seeds' rough formula counts ViT patches (48 here), not the 12 merged tokens
    assert row["flops_vision"] == 2.0 * tiny.param_counts()["vision_encoder"] * 48
    assert row["flops_total_analytic"] == sum(row[f"flops_{s}_analytic"]
                                              for s in ("vision", "projector", "llm_prefill", "llm_decode"))


# -- helpers the families share (flexvlm_ray.models.hf_common) ----------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(device="cpu", dtype="float64"), ValueError, "dtype 'float64' is not one of float32, bfloat16, float16"),
    (dict(device="cuda:0", dtype="float32"), RuntimeError, "device 'cuda:0' was requested but CUDA is not available"),
])
def test_device_and_dtype_errors(kwargs, error, message, monkeypatch):
    from flexvlm_ray.models.hf_common import device_and_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)    # the same answer on a GPU machine
    with pytest.raises(error, match=message):
        device_and_dtype(**kwargs)
    assert device_and_dtype(device="cpu", dtype="bfloat16") == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("requested, default, limit, expected", [
    (None, 8, 24, 8), (1, 8, 24, 1), (24, 8, 24, 24), (0, 8, 24, "allowed 1..24"), (13, 12, 12, "allowed 1..12"),
])
def test_max_crops_for(requested, default, limit, expected):
    from flexvlm_ray.models.hf_common import max_crops_for

    if isinstance(expected, str):
        with pytest.raises(ValueError, match=f"max_crops={requested} is out of range: {expected}"):
            max_crops_for(knobs=Knobs(max_crops=requested), default=default, limit=limit)
    else:
        assert max_crops_for(knobs=Knobs(max_crops=requested), default=default, limit=limit) == expected


def test_prefill_state_and_decode_bookkeeping():
    from flexvlm_ray.models.hf_common import check_blocks_unchanged, prefill_state, record_token

    state = prefill_state(logits=torch.tensor([0.0, 3.0, 1.0]), cache="kv", position=5, blocks=(0, 2), epoch=7)
    assert (state.next_token, state.tokens, state.cache, state.position) == (1, [1], "kv", 5)
    assert list(state.extras) == ["blocks", "logits", "epoch"] and state.extras["blocks"] == (0, 2)
    check_blocks_unchanged(state=state, active=(0, 2))
    with pytest.raises(RuntimeError, match=r"active blocks changed during decoding: prefill ran \(0, 2\), now \(0, 1\)"):
        check_blocks_unchanged(state=state, active=(0, 1))
    assert record_token(state=state, token=4, logits="step") == 4
    assert (state.next_token, state.tokens, state.position, state.extras["logits"]) == (4, [1, 4], 6, "step")


@pytest.mark.parametrize("active, num_experts, top_k, expected", [
    ((0, 1, 2), 4, 4, 3 * 100),                       # every block, every expert
    ((0, 2), 4, 4, 3 * 100 - 100),                    # block 1 skipped
    ((0, 1, 2), 4, 1, 3 * 100 - 3 * (80 - 20)),       # 1 of 4 experts (80 expert parameters, 20 each)
    ((1,), 0, 0, 100),                                # dense decoder: only skipped blocks leave
])
def test_active_llm_params(active, num_experts, top_k, expected):
    from flexvlm_ray.models.hf_common import active_llm_params

    blocks = [torch.nn.Linear(10, 10, bias=False) for _ in range(3)]     # 100 parameters each
    assert active_llm_params(llm=300, blocks=blocks, active=active, num_experts=num_experts, top_k=top_k,
                             expert_params=lambda block: 80) == expected


def test_local_checkpoint_folder_loads_and_runs_with_knobs(tiny, tmp_path):
    """A Qwen3-VL-MoE checkpoint from a local folder (save_pretrained layout: config.json, safetensors,
    tokenizer files) gives the logits of the model that wrote it, under the knobs."""
    from transformers import PreTrainedTokenizerFast

    from flexvlm_ray.models.qwen3_vl_moe.adapter import TINY_MAX_PIXELS

    folder = tmp_path / "qwen3-ckpt"
    tiny.model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tiny.tokenizer, unk_token="[UNK]").save_pretrained(folder)
    loaded = MODELS.get("qwen3_vl_moe")(preset=None, path=str(folder), dtype="float32", device="cpu", seed=1,
                                        options={"max_pixels": TINY_MAX_PIXELS})
    for knobs in (Knobs(), Knobs(top_k=1, active_blocks=2, block_policy="prefix")):
        results = []
        for adapter in (tiny, loaded):
            adapter.apply_knobs(knobs)
            try:
                results.append(run(adapter, sample(), knobs)[1].extras["logits"])
            finally:
                adapter.restore_knobs()
        assert torch.allclose(results[0], results[1], atol=1e-5, rtol=1e-5)
