"""A MolmoE checkpoint folder in flexmoe: a tiny folder in the released layout (bf16, sharded
safetensors with an index, tokenizer.json, config.json, preprocessor_config.json) loads, and the hf
and fast backends give the logits of an independent reference forward written from the documented
semantics, under the knobs; other depths and widths load the same way; the molmoe-1b preset is the
released config's shape; every bad folder is one line and exit 2; verify-knobs passes on the folder."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import molmoe_support as ms
from flexvlm_ray.cli import main
from flexvlm_ray.data.base import Sample
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.flexmoe.checkpoint import (CheckpointError, molmo_config, open_molmo_checkpoint,
                                                   weight_plan)
from flexvlm_ray.models.flexmoe.config import PRESETS
from flexvlm_ray.models.flexmoe.model import FlexMoeModel, default_dtype
from model_support import rel_err

REL_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("module_cache")   # importance scores in a throw-away cache


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ms.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "molmoe-tiny")


@pytest.fixture(scope="module")
def weights():
    return {n: t.float() for n, t in ms.random_tensors().items()}


def load(path, backend: str = "hf", dtype: str = "float32"):
    extra = {} if backend == "hf" else {"backend": backend}
    return MODELS.get("flexmoe")(preset=None, path=str(path), dtype=dtype, device="cpu", seed=0, options={}, **extra)


@pytest.fixture(scope="module")
def adapters(folder):
    return {"hf": load(folder), "fast": load(folder, backend="fast")}


def sample(width: int = 70, height: int = 50) -> Sample:
    pixels = torch.arange(width * height * 3, dtype=torch.int64).reshape(height, width, 3) * 37 % 251
    return Sample(sample_id="s", image=Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB"),
                  prompt="what color is the car ?")


def reference(weights, prepared, *, top_k: int, blocks=None, config=ms.CONFIG):
    inputs = prepared.inputs
    feats = ms.reference_image_features(weights, pixels=inputs["pixel_values"], image_masks=inputs["image_masks"],
                                        config=config)
    pairs = list(zip(inputs["feature_index"].tolist(), inputs["image_positions"].tolist()))
    return ms.reference_logits(weights, input_ids=inputs["input_ids"][0].tolist(), image_features=feats,
                               image_input_idx=pairs, top_k=top_k, blocks=blocks, config=config)


KNOBS = [Knobs(), Knobs(top_k=1), Knobs(top_k=6, max_crops=2), Knobs(active_blocks=2, block_policy="prefix"),
         Knobs(active_blocks=2, block_policy="random", top_k=2, max_crops=1)]


@pytest.mark.parametrize("backend", ["hf", "fast"])
@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: f"k{k.top_k}-b{k.active_blocks}{k.block_policy}-c{k.max_crops}")
def test_logits_match_the_reference_forward(adapters, weights, backend, knobs):
    adapter = adapters[backend]
    adapter.apply_knobs(knobs)
    try:
        prepared = adapter.prepare(sample=sample(), knobs=knobs)
        state = adapter.prefill(prepared, adapter.projector(prepared, adapter.vision_encoder(prepared)))
        blocks = list(adapter.active_block_indices())
    finally:
        adapter.restore_knobs()
    assert prepared.num_crops <= (knobs.max_crops or ms.CONFIG["max_crops"]) + 1
    expected = reference(weights, prepared, top_k=knobs.top_k or ms.CONFIG["moe_top_k"], blocks=blocks)
    assert rel_err(state.extras["logits"], expected) < REL_TOL


def test_fast_triton_kernels_match_the_reference(folder, weights):
    """The fast backend's Triton kernels and fused MoE (Triton's interpreter on the CPU) at these sizes."""
    adapter = MODELS.get("flexmoe")(preset=None, path=str(folder), dtype="float32", device="cpu", seed=0,
                                    options={"kernels": "triton", "prefill_moe": "fused", "decode_moe": "fused"},
                                    backend="fast")
    knobs = Knobs(top_k=2, max_crops=2)
    adapter.apply_knobs(knobs)
    prepared = adapter.prepare(sample=sample(), knobs=knobs)
    state = adapter.prefill(prepared, adapter.projector(prepared, adapter.vision_encoder(prepared)))
    assert rel_err(state.extras["logits"], reference(weights, prepared, top_k=2)) < REL_TOL


def test_knobs_change_the_logits(adapters, weights):
    """The reference itself reacts to top_k and blocks, so the comparisons above can fail."""
    adapter = adapters["hf"]
    prepared = adapter.prepare(sample=sample(), knobs=Knobs())
    full = reference(weights, prepared, top_k=3)
    assert rel_err(reference(weights, prepared, top_k=1), full) > 1e-2
    assert rel_err(reference(weights, prepared, top_k=3, blocks=[0, 1]), full) > 1e-2


def test_bf16_load_keeps_the_tensors_values(folder):
    adapter = load(folder, dtype="bfloat16")
    raw = ms.random_tensors()
    emb = adapter.model.decoder.model.embed_tokens.weight
    assert emb.dtype == torch.bfloat16 and emb.shape == (ms.EMBEDDING_SIZE + ms.ADDITIONAL, 32)
    assert torch.equal(emb[:ms.EMBEDDING_SIZE], raw["model.transformer.wte.embedding"])
    assert torch.equal(emb[ms.EMBEDDING_SIZE:], raw["model.transformer.wte.new_embedding"])
    gate_up = adapter.model.blocks[1].mlp.experts.gate_up_proj[4]
    assert torch.equal(gate_up[16:], raw["model.transformer.blocks.1.mlp.experts.4.up_proj.weight"])


def test_prompt_decode_and_eos(adapters):
    adapter = adapters["hf"]
    tok = ms.tokenizer()
    prepared = adapter.prepare(sample=sample(), knobs=Knobs())
    ids = prepared.inputs["input_ids"][0].tolist()
    eos = tok.token_to_id("<|endoftext|>")
    assert ids[0] == eos == adapter.eos_token_id                      # BOS = EOS
    text = [tok.token_to_id(w) for w in ("user", ":", "what", "color", "is", "the", "car", "?", "assistant", ":")]
    assert ids[-len(text):] == text and ids[-len(text) - 1] == tok.token_to_id("<im_end>")
    assert adapter.decode_text([tok.token_to_id("red"), tok.token_to_id("car"), eos]) == "red car"


def test_other_sizes_load_the_same_way(tmp_path):
    """Depth, width, experts, top_k and ViT depth all come from config.json."""
    config = copy.deepcopy(ms.CONFIG)
    config.update(d_model=48, n_heads=6, n_layers=2, moe_num_experts=4, moe_top_k=2, vit_layers=[-1, 0])
    config["vision_backbone"].update(image_num_layers=2, image_emb_dim=24, image_num_heads=3,
                                     image_num_key_value_heads=3, image_head_dim=8)
    gen = torch.Generator().manual_seed(3)
    tensors = {n: (torch.randn(s, generator=gen) / (s[-1] ** 0.5 if len(s) > 1 else 2.0) + (1.0 if "norm" in n else 0.0))
               for n, s in ms.tensor_shapes(config).items()}
    path = ms.write_checkpoint(tmp_path / "other", tensors=tensors, shards=1, config=config)
    adapter = load(path)
    assert (adapter.info.num_blocks, adapter.info.num_experts, adapter.info.default_top_k) == (2, 4, 2)
    prepared = adapter.prepare(sample=sample(), knobs=Knobs())
    state = adapter.prefill(prepared, adapter.projector(prepared, adapter.vision_encoder(prepared)))
    # Molmo's vit_layers index the list of block outputs: [-1, 0] are blocks 1 and 0
    ref_config = dict(config, vit_layers=[-1, 0])
    assert rel_err(state.extras["logits"], reference(tensors, prepared, top_k=2, config=ref_config)) < REL_TOL


def test_bin_checkpoint_loads(tmp_path, weights, adapters):
    path = ms.write_checkpoint(tmp_path / "bin", shards=1)
    for f in path.glob("*.safetensors"):
        f.unlink()
    (path / "model.safetensors.index.json").unlink()
    torch.save({n: t.float() for n, t in ms.random_tensors().items()}, str(path / "pytorch_model.bin"))
    adapter = load(path)
    prepared = adapter.prepare(sample=sample(), knobs=Knobs())
    state = adapter.prefill(prepared, adapter.projector(prepared, adapter.vision_encoder(prepared)))
    assert rel_err(state.extras["logits"], reference(weights, prepared, top_k=3)) < REL_TOL


def test_plan_is_the_documented_layout_and_fills_every_parameter():
    config = molmo_config(ms.CONFIG, preprocessor=ms.PREPROCESSOR)
    plan = weight_plan(config)
    assert {n: s.shape for n, s in plan.items()} == ms.tensor_shapes()
    with torch.device("meta"), default_dtype(torch.float32):
        model = FlexMoeModel(config)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {w.target for s in plan.values() for w in s.writes} == set(params)


RELEASED = {   # the released MolmoE-1B config.json keys a converter reads (../shared/MOLMOE_CHECKPOINT.md)
    "model_type": "molmo", "architectures": ["OLMoForCausalLM"], "block_type": "moe", "moe_mlp_impl": "sparse",
    "d_model": 2048, "n_heads": 16, "n_kv_heads": None, "n_layers": 16, "mlp_ratio": 1, "mlp_hidden_size": None,
    "moe_num_experts": 64, "moe_top_k": 8, "layer_norm_eps": 1e-5, "attention_layer_norm": True,
    "rope_theta": 10000.0, "vocab_size": 50280, "embedding_size": 50304, "additional_vocab_size": 128,
    "weight_tying": False, "include_bias": False, "layer_norm_type": "rms", "rope_impl": "llama",
    "pad_token_id": 1, "use_col_tokens": True, "message_formatting": "role", "always_start_with_space": True,
    "max_crops": 12, "crop_mode": "overlap-and-resize-c2", "overlap_margins": [4, 4], "vit_layers": [-2, -9],
    "image_pooling_2d": "attention-meanq", "image_projector": "mlp", "image_padding_embed": "pad_and_partial_pad",
    "use_cls_feature": False, "max_sequence_length": 4096,
    "vision_backbone": {"image_model_type": "openai", "image_default_input_size": [336, 336], "image_patch_size": 14,
                        "image_pos_patch_size": 14, "image_emb_dim": 1024, "image_num_heads": 16,
                        "image_num_key_value_heads": 16, "image_head_dim": 64, "image_mlp_dim": 4096,
                        "image_mlp_activations": "quick_gelu", "image_num_layers": 23, "image_num_pos": 577,
                        "image_norm_eps": 1e-5},
}


def test_molmoe_1b_preset_is_the_released_shape():
    released = molmo_config(RELEASED, preprocessor={"base_image_input_size": [336, 336], "image_patch_size": 14,
                                                    "image_token_length_h": 12, "image_token_length_w": 12,
                                                    "max_crops": 12, "overlap_margins": [4, 4]})
    preset = PRESETS["molmoe-1b"]
    assert released.to_dict() | {"name": preset.name} == preset.to_dict()
    plan = weight_plan(preset)
    table = {"model.transformer.wte.embedding": (50304, 2048), "model.transformer.wte.new_embedding": (128, 2048),
             "lm_head.weight": (50304, 2048), "model.transformer.blocks.15.attn.att_proj.weight": (6144, 2048),
             "model.transformer.blocks.0.mlp.experts.63.down_proj.weight": (2048, 1024),
             "model.vision_backbone.image_vit.patch_embedding.weight": (1024, 588),
             "model.vision_backbone.image_vit.positional_embedding": (577, 1024),
             "model.vision_backbone.image_vit.transformer.resblocks.22.feed_forward.w1.weight": (4096, 1024),
             "model.vision_backbone.pad_embed": (2, 2048),
             "model.vision_backbone.image_pooling_2d.wq.weight": (1024, 2048),
             "model.vision_backbone.image_pooling_2d.wo.weight": (1024, 1024),
             "model.vision_backbone.image_projector.w1.weight": (1024, 1024),
             "model.vision_backbone.image_projector.w2.weight": (2048, 1024)}
    assert {n: plan[n].shape for n in table} == table
    assert "model.vision_backbone.image_vit.transformer.resblocks.23.attention.wq.weight" not in plan


# -- bad folders: one line, exit 2 ------------------------------------------------------------------
def _drop(tensors):
    tensors.pop("model.transformer.blocks.2.mlp.experts.5.up_proj.weight")


def _reshape(tensors):
    tensors["model.vision_backbone.pad_embed"] = torch.zeros(3, 32, dtype=torch.bfloat16)


def _int(tensors):
    tensors["model.transformer.ln_f.weight"] = torch.ones(32, dtype=torch.int32)


def _extra(tensors):
    tensors["model.transformer.blocks.0.attn.attn_out.bias"] = torch.zeros(32, dtype=torch.bfloat16)


BAD = [
    (_drop, None, "is missing 1 tensor(s): model.transformer.blocks.2.mlp.experts.5.up_proj.weight"),
    (_reshape, None, "tensor model.vision_backbone.pad_embed has shape [3, 32], expected [2, 32]"),
    (_int, None, "tensor model.transformer.ln_f.weight has dtype I32"),
    (_extra, None, "does not use: model.transformer.blocks.0.attn.attn_out.bias"),
    (None, {"model_type": "llava"}, "unknown model type 'llava'"),
    (None, {"image_pooling_2d": "2x2"}, "image_pooling_2d '2x2' (only 'attention-meanq') is not supported"),
]


@pytest.mark.parametrize("change,config_change,message", BAD, ids=lambda v: getattr(v, "__name__", None))
def test_bad_checkpoint_is_one_line_and_exit_2(tmp_path, change, config_change, message):
    tensors = ms.random_tensors()
    if change is not None:
        change(tensors)
    path = ms.write_checkpoint(tmp_path / "bad", tensors=tensors, shards=2, config=dict(ms.CONFIG, **(config_change or {})))
    result = CliRunner().invoke(main, ["verify-knobs", "--model", "flexmoe", "--path", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises((CheckpointError, ValueError)):
        open_molmo_checkpoint(path)


def test_missing_shard_and_tokenizer_are_named(tmp_path):
    path = ms.write_checkpoint(tmp_path / "shards", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard\\(s\\) that are not in the folder: model-00002-of-00002"):
        open_molmo_checkpoint(path)
    path = ms.write_checkpoint(tmp_path / "tok")
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        open_molmo_checkpoint(path)


def test_tokenizer_without_image_tokens_gets_them_after_its_vocabulary(tmp_path):
    path = ms.write_checkpoint(tmp_path / "plain")
    data = json.loads((path / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] == "<|endoftext|>"]
    (path / "tokenizer.json").write_text(json.dumps(data))
    adapter = load(path)
    assert adapter.prompt_tokens.im_start == ms.BASE_VOCAB and adapter.prompt_tokens.im_col == ms.BASE_VOCAB + 3


def test_verify_knobs_passes_on_the_folder(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXVLM_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["verify-knobs", "--model", "flexmoe", "--path", str(folder)])
    assert result.exit_code == 0, result.output
    passed, total = result.output.splitlines()[-1].split()[0].split("/")
    assert passed == total and int(total) > 10
