"""A MolmoE checkpoint folder (the released MolmoE-1B or a fine-tune of it) loaded into ``flexmoe``.

``model: {family: flexmoe, path: DIR}`` reads DIR/config.json as JSON (transformers has no native
"molmo" type; its ``architectures`` says OLMoForCausalLM). A config with ``model_type`` "molmo" is a
MolmoE checkpoint; one without ``model_type`` is flexmoe's own format (``save_flexmoe``); any other
``model_type`` is an error. For a MolmoE checkpoint:

* ``molmo_config`` maps config.json (and preprocessor_config.json where present) to a
  ``FlexMoeConfig``: every size comes from the files (depth, width, heads, experts, top_k, ViT depth
  and width, crop and patch size, margins, feature layers, vocabulary), and settings this model does
  not implement (another pooling, projector, block type, tied weights, a CLS feature ...) are errors.
* ``weight_plan`` names every tensor the checkpoint must hold (names and shapes of
  ../shared/MOLMOE_CHECKPOINT.md, scaled by the config) and where it goes in ``FlexMoeModel``:
  ``att_proj`` is split into q/k/v, the experts' gate/up rows fill ``gate_up_proj``, ``embedding``
  and ``new_embedding`` fill the token embedding, the ViT's patch Linear over (ph, pw, c) becomes
  CLIP's patch convolution. The plan covers every parameter of the model (a test checks it).
* ``inventory`` lists the tensors of the folder without reading them (safetensors headers: one file,
  or shards with their ``model.safetensors.index.json``, any count; or a ``pytorch_model.bin``
  / its shards read with ``weights_only=True``), and ``check_inventory`` turns a missing, extra,
  mis-shaped or non-float tensor into one error line that names it, before anything is built.
* ``load_molmo_checkpoint`` builds the model on the meta device, allocates it on the target
  device and copies every tensor in, one at a time, cast from its own dtype (float32, bfloat16 or
  float16) to the spec's dtype: nothing is left random.

The tokenizer is the folder's ``tokenizer.json`` (``tokenizers``); when it lacks Molmo's image
tokens they are added after its vocabulary in the processor's order, and must land on the ids the
embedding expects (``<im_start>`` = ``vocab_size`` ...).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer

from flexvlm_ray.models.flexmoe.config import FlexMoeConfig
from flexvlm_ray.models.flexmoe.model import FlexMoeModel, _reset_nonpersistent_buffers, default_dtype
from flexvlm_ray.models.molmo_preprocess import MOLMO_EXTRA_TOKENS

CONFIG_FILE, PREPROCESSOR_FILE, TOKENIZER_FILE = "config.json", "preprocessor_config.json", "tokenizer.json"
SAFETENSORS_INDEX, SAFETENSORS_FILE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_FILE = "pytorch_model.bin.index.json", "pytorch_model.bin"
FLOAT_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SAFETENSORS_FLOATS = {"F32", "BF16", "F16"}
# names some exports use for the same tensor (the name on the right is the documented one)
ALIASES = {"model.transformer.ff_out.weight": "lm_head.weight"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message is one line naming the problem."""


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def checkpoint_kind(folder: str | os.PathLike) -> str:
    """'flexmoe' (a folder written by save_flexmoe) or 'molmo' (a MolmoE checkpoint); else an error."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return "flexmoe"            # read_flexmoe_config names the missing files
    raw = read_config_json(folder)
    model_type = raw.get("model_type")
    if model_type is None and "name" in raw:
        return "flexmoe"
    if model_type == "molmo":
        return "molmo"
    raise CheckpointError(f"unknown model type {model_type!r} in {path}; family 'flexmoe' reads its own folders "
                          f"(save_flexmoe) and MolmoE checkpoints (model_type 'molmo')")


def _need(raw: dict[str, Any], key: str, where: str) -> Any:
    if key not in raw or raw[key] is None:
        raise CheckpointError(f"{where} has no '{key}'")
    return raw[key]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckpointError(message)


def molmo_config(raw: dict[str, Any], *, preprocessor: Optional[dict[str, Any]] = None,
                 name: str = "molmoe-checkpoint") -> FlexMoeConfig:
    """A ``FlexMoeConfig`` from a MolmoE config.json (and preprocessor_config.json); every size from the files."""
    where = CONFIG_FILE
    _require(raw.get("model_type") == "molmo", f"{where}: model_type {raw.get('model_type')!r} is not 'molmo'")
    vb = _need(raw, "vision_backbone", where)
    vwhere = f"{where} vision_backbone"
    unsupported = [
        (raw.get("block_type", "moe") == "moe", f"block_type {raw.get('block_type')!r} (only 'moe')"),
        (int(raw.get("moe_num_experts") or 0) > 0, "moe_num_experts 0 (a dense model)"),
        (not raw.get("weight_tying", False), "weight_tying true"),
        (not raw.get("include_bias", False), "include_bias true"),
        (raw.get("layer_norm_type", "rms") == "rms", f"layer_norm_type {raw.get('layer_norm_type')!r}"),
        (raw.get("attention_layer_norm", True), "attention_layer_norm false"),
        (not raw.get("norm_after", False), "norm_after true"),
        (raw.get("clip_qkv") is None, "clip_qkv"),
        (not raw.get("use_cls_feature", False), "use_cls_feature true"),
        (not raw.get("normalize_input_embeds", False), "normalize_input_embeds true"),
        (raw.get("image_pooling_2d", "attention-meanq") in ("attention-meanq", "attention_meanq"),
         f"image_pooling_2d {raw.get('image_pooling_2d')!r} (only 'attention-meanq')"),
        (raw.get("image_projector", "mlp") == "mlp", f"image_projector {raw.get('image_projector')!r} (only 'mlp')"),
        (raw.get("image_padding_embed", "pad_and_partial_pad") == "pad_and_partial_pad",
         f"image_padding_embed {raw.get('image_padding_embed')!r} (only 'pad_and_partial_pad')"),
        (raw.get("crop_mode", "overlap-and-resize-c2") == "overlap-and-resize-c2",
         f"crop_mode {raw.get('crop_mode')!r} (only 'overlap-and-resize-c2')"),
        (raw.get("use_col_tokens", True), "use_col_tokens false"),
        (raw.get("message_formatting", "role") == "role", f"message_formatting {raw.get('message_formatting')!r}"),
        (raw.get("always_start_with_space", True), "always_start_with_space false"),
        (raw.get("rope", True) and raw.get("rope_impl", "llama") == "llama", "a rope other than 'llama'"),
        (vb.get("image_model_type", "openai") == "openai", f"image_model_type {vb.get('image_model_type')!r}"),
        (vb.get("image_mlp_activations", "quick_gelu") == "quick_gelu",
         f"image_mlp_activations {vb.get('image_mlp_activations')!r}"),
        (raw.get("activation_type", "swiglu") == "swiglu", f"activation_type {raw.get('activation_type')!r}"),
    ]
    for ok, what in unsupported:
        _require(bool(ok), f"{where}: {what} is not supported by family 'flexmoe'")
    d_model, n_heads = int(_need(raw, "d_model", where)), int(_need(raw, "n_heads", where))
    hidden = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio") or 4) * d_model
    emb, heads = int(_need(vb, "image_emb_dim", vwhere)), int(_need(vb, "image_num_heads", vwhere))
    head_dim = int(vb.get("image_head_dim") or emb // heads)
    _require(heads * head_dim == emb, f"{vwhere}: image_num_heads * image_head_dim != image_emb_dim")
    _require(int(vb.get("image_num_key_value_heads") or heads) == heads,
             f"{vwhere}: image_num_key_value_heads != image_num_heads is not supported")
    vit_layers = int(_need(vb, "image_num_layers", vwhere))
    size = list(_need(vb, "image_default_input_size", vwhere))
    patch = int(_need(vb, "image_patch_size", vwhere))
    _require(size[0] == size[1], f"{vwhere}: non-square image_default_input_size {size}")
    _require(int(vb.get("image_pos_patch_size", patch)) == patch, f"{vwhere}: image_pos_patch_size != image_patch_size")
    _require(int(vb.get("image_num_pos", (size[0] // patch) ** 2 + 1)) == (size[0] // patch) ** 2 + 1,
             f"{vwhere}: image_num_pos {vb.get('image_num_pos')} does not match {size[0]} px crops of {patch} px patches")
    pre = preprocessor or {}
    margins = tuple(pre.get("overlap_margins") or raw.get("overlap_margins") or (4, 4))
    _require(len(margins) == 2, f"overlap_margins {margins} must have two entries")
    _require(list(pre.get("base_image_input_size", size)) == size,
             f"{PREPROCESSOR_FILE}: base_image_input_size {pre.get('base_image_input_size')} != the ViT's {size}")
    _require(int(pre.get("image_patch_size", patch)) == patch, f"{PREPROCESSOR_FILE}: image_patch_size != the ViT's")
    pooled = (size[0] // patch + 1) // 2
    for key in ("image_token_length_h", "image_token_length_w"):
        _require(int(pre.get(key, pooled)) == pooled, f"{PREPROCESSOR_FILE}: {key} {pre.get(key)} != {pooled}")
    feature_layers = tuple(int(v) if int(v) < 0 else int(v) + 1 for v in (raw.get("vit_layers") or (-1,)))
    vocab = int(raw.get("embedding_size") or _need(raw, "vocab_size", where))
    mean = tuple(pre.get("image_mean") or vb.get("image_mean") or FlexMoeConfig.image_mean)
    std = tuple(pre.get("image_std") or vb.get("image_std") or FlexMoeConfig.image_std)
    if pre.get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    try:
        return FlexMoeConfig(
            name=name, crop_px=size[0], tiling_patch_px=patch, tiling_margins=margins,
            max_crops=int(pre.get("max_crops") or raw.get("max_crops") or 12), pool_margin=margins[0] // 2,
            vit_patch_px=patch, vit_hidden=emb, vit_intermediate=int(_need(vb, "image_mlp_dim", vwhere)),
            vit_layers=vit_layers, vit_heads=heads, vit_feature_layers=feature_layers, pool_dim=emb, pool_heads=heads,
            projector_hidden=int(hidden) // 2, hidden_size=d_model, num_blocks=int(_need(raw, "n_layers", where)),
            num_heads=n_heads, num_kv_heads=int(raw.get("n_kv_heads") or 0),
            num_experts=int(raw["moe_num_experts"]), top_k=int(_need(raw, "moe_top_k", where)),
            expert_width=int(hidden) // 2, vocab_size=vocab, max_positions=int(raw.get("max_sequence_length") or 4096),
            rope_theta=float(raw.get("rope_theta") or 10000.0), rms_norm_eps=float(raw.get("layer_norm_eps") or 1e-5),
            extra_embeddings=int(raw.get("additional_vocab_size") or 0), vit_post_layernorm=False, pad_embed=True,
            image_embed_mode="add", preprocess="molmo", image_mean=mean, image_std=std)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


# -- the weight plan ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Write:
    """Copy a (transformed) checkpoint tensor into ``target[index]`` of the model's state dict."""

    target: str
    index: tuple = ()
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor: its expected shape and where it goes."""

    shape: tuple[int, ...]
    writes: tuple[Write, ...] = field(default_factory=tuple)


def weight_plan(config: FlexMoeConfig) -> dict[str, Source]:
    """Every tensor a MolmoE checkpoint of ``config``'s shape holds, with its target in ``FlexMoeModel``."""
    c = config
    d, v, extra = c.hidden_size, c.vocab_size, c.extra_embeddings
    hd = d // c.num_heads
    kv = c.kv_heads * hd
    e_dim, mlp, patch, pos = c.vit_hidden, c.vit_intermediate, c.vit_patch_px, c.patches_per_side ** 2 + 1
    feat = e_dim * len(c.vit_feature_layers)
    plan: dict[str, Source] = {}

    def add(name: str, shape: tuple[int, ...], *writes: Write) -> None:
        plan[name] = Source(shape=tuple(shape), writes=tuple(writes))

    def same(name: str, shape: tuple[int, ...], target: str) -> None:
        add(name, shape, Write(target))

    t, dec = "model.transformer", "decoder.model"
    add(f"{t}.wte.embedding", (v, d), Write(f"{dec}.embed_tokens.weight", (slice(0, v),)))
    if extra:
        add(f"{t}.wte.new_embedding", (extra, d), Write(f"{dec}.embed_tokens.weight", (slice(v, v + extra),)))
    same(f"{t}.ln_f.weight", (d,), f"{dec}.norm.weight")
    same("lm_head.weight", (v, d), "decoder.lm_head.weight")
    for b in range(c.num_blocks):
        src, dst = f"{t}.blocks.{b}", f"{dec}.layers.{b}"
        add(f"{src}.attn.att_proj.weight", (d + 2 * kv, d),
            Write(f"{dst}.self_attn.q_proj.weight", transform=lambda x: x[:d]),
            Write(f"{dst}.self_attn.k_proj.weight", transform=lambda x: x[d:d + kv]),
            Write(f"{dst}.self_attn.v_proj.weight", transform=lambda x: x[d + kv:]))
        same(f"{src}.attn.attn_out.weight", (d, d), f"{dst}.self_attn.o_proj.weight")
        same(f"{src}.attn.attn_norm.weight", (d,), f"{dst}.input_layernorm.weight")
        same(f"{src}.attn.q_norm.weight", (d,), f"{dst}.self_attn.q_norm.weight")
        same(f"{src}.attn.k_norm.weight", (kv,), f"{dst}.self_attn.k_norm.weight")
        same(f"{src}.mlp.ff_norm.weight", (d,), f"{dst}.post_attention_layernorm.weight")
        same(f"{src}.mlp.gate.weight", (c.num_experts, d), f"{dst}.mlp.gate.weight")
        width = c.expert_width
        for e in range(c.num_experts):
            ex = f"{src}.mlp.experts.{e}"
            add(f"{ex}.gate_proj.weight", (width, d), Write(f"{dst}.mlp.experts.gate_up_proj", (e, slice(0, width))))
            add(f"{ex}.up_proj.weight", (width, d), Write(f"{dst}.mlp.experts.gate_up_proj", (e, slice(width, 2 * width))))
            add(f"{ex}.down_proj.weight", (d, width), Write(f"{dst}.mlp.experts.down_proj", (e,)))
    vit, emb = "model.vision_backbone.image_vit", "vision"
    same(f"{vit}.class_embedding", (e_dim,), f"{emb}.embeddings.class_embedding")
    same(f"{vit}.positional_embedding", (pos, e_dim), f"{emb}.embeddings.position_embedding.weight")
    add(f"{vit}.patch_embedding.weight", (e_dim, patch * patch * 3),
        Write(f"{emb}.embeddings.patch_embedding.weight",
              transform=lambda x: x.reshape(e_dim, patch, patch, 3).permute(0, 3, 1, 2)))
    for part in ("weight", "bias"):
        same(f"{vit}.pre_ln.{part}", (e_dim,), f"{emb}.pre_layrnorm.{part}")
    for layer in range(c.vit_layers):
        src, dst = f"{vit}.transformer.resblocks.{layer}", f"{emb}.encoder.layers.{layer}"
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "out_proj")):
            same(f"{src}.attention.{ours}.weight", (e_dim, e_dim), f"{dst}.self_attn.{theirs}.weight")
            same(f"{src}.attention.{ours}.bias", (e_dim,), f"{dst}.self_attn.{theirs}.bias")
        same(f"{src}.feed_forward.w1.weight", (mlp, e_dim), f"{dst}.mlp.fc1.weight")
        same(f"{src}.feed_forward.w1.bias", (mlp,), f"{dst}.mlp.fc1.bias")
        same(f"{src}.feed_forward.w2.weight", (e_dim, mlp), f"{dst}.mlp.fc2.weight")
        same(f"{src}.feed_forward.w2.bias", (e_dim,), f"{dst}.mlp.fc2.bias")
        for ours, theirs in (("attention_norm", "layer_norm1"), ("ffn_norm", "layer_norm2")):
            for part in ("weight", "bias"):
                same(f"{src}.{ours}.{part}", (e_dim,), f"{dst}.{theirs}.{part}")
    vb = "model.vision_backbone"
    same(f"{vb}.pad_embed", (2, feat), "pad.weight")
    for proj in ("wq", "wk", "wv"):
        same(f"{vb}.image_pooling_2d.{proj}.weight", (c.pool_dim, feat), f"pool.{proj}.weight")
        same(f"{vb}.image_pooling_2d.{proj}.bias", (c.pool_dim,), f"pool.{proj}.bias")
    same(f"{vb}.image_pooling_2d.wo.weight", (c.pool_dim, c.pool_dim), "pool.wo.weight")
    same(f"{vb}.image_pooling_2d.wo.bias", (c.pool_dim,), "pool.wo.bias")
    same(f"{vb}.image_projector.w1.weight", (c.projector_hidden, c.pool_dim), "projector.w1.weight")
    same(f"{vb}.image_projector.w3.weight", (c.projector_hidden, c.pool_dim), "projector.w3.weight")
    same(f"{vb}.image_projector.w2.weight", (d, c.projector_hidden), "projector.w2.weight")
    return plan


# -- the folder's tensors ----------------------------------------------------------------------
def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder: the shards its index names, or its single file."""
    root = Path(folder)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a weight index (no 'weight_map')") from None
            files = sorted({root / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are not in the folder: {', '.join(missing)}")
            return files
    for single in (SAFETENSORS_FILE, BIN_FILE):
        if (root / single).is_file():
            return [root / single]
    shards = sorted(root.glob("*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"no weights in '{root}': expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} with its shards, "
                          f"or {BIN_FILE}")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:   # noqa: BLE001  (torch raises several types for a bad or unsafe file)
        raise CheckpointError(f"{path} cannot be read with weights_only=True: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def inventory(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name) of every tensor in the files, read from the headers where possible."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    out[name] = (tuple(piece.get_shape()), str(piece.get_dtype()))
        else:
            for name, tensor in _load_bin(path).items():
                out[name] = (tuple(tensor.shape), FLOAT_DTYPES.get(tensor.dtype, str(tensor.dtype)))
    return out


def _canonical(name: str) -> str:
    return ALIASES.get(name, name)


def check_inventory(*, plan: dict[str, Source], tensors: dict[str, tuple[tuple[int, ...], str]],
                    folder: str | os.PathLike) -> None:
    """One-line errors for missing, extra, mis-shaped or non-float tensors (the first few of each named)."""
    def names(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    seen = {_canonical(n): n for n in tensors}
    missing = [n for n in plan if n not in seen]
    if missing:
        raise CheckpointError(f"checkpoint '{folder}' is missing {len(missing)} tensor(s): {names(missing)}")
    extra = [n for n in tensors if _canonical(n) not in plan]
    if extra:
        raise CheckpointError(f"checkpoint '{folder}' has {len(extra)} tensor(s) this model does not use: {names(extra)}")
    for name, (shape, dtype) in tensors.items():
        expected = plan[_canonical(name)].shape
        if shape != expected:
            raise CheckpointError(f"checkpoint '{folder}': tensor {name} has shape {list(shape)}, expected {list(expected)}")
        if dtype not in SAFETENSORS_FLOATS:
            raise CheckpointError(f"checkpoint '{folder}': tensor {name} has dtype {dtype}; "
                                  f"expected float32, bfloat16 or float16")


def _iter_tensors(files: list[Path], *, device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        else:
            for name, tensor in _load_bin(path).items():
                yield name, tensor.to(device)


# -- the whole folder --------------------------------------------------------------------------
@dataclass(frozen=True)
class MolmoCheckpoint:
    """A validated MolmoE folder: its config, plan and weight files."""

    folder: Path
    config: FlexMoeConfig
    plan: dict[str, Source]
    files: list[Path]


def open_molmo_checkpoint(folder: str | os.PathLike) -> MolmoCheckpoint:
    """Read and check a MolmoE folder (config, preprocessor config, tokenizer file, every tensor's
    name, shape and dtype) without loading weights; a ``CheckpointError`` names the first problem."""
    root = Path(folder)
    raw = read_config_json(root)
    pre_path = root / PREPROCESSOR_FILE
    try:
        preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{pre_path} is not valid JSON: {exc}") from None
    if not (root / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"checkpoint '{root}' has no {TOKENIZER_FILE} (the tokenizers file of its tokenizer)")
    config = molmo_config(raw, preprocessor=preprocessor, name=root.name or "molmoe-checkpoint")
    plan = weight_plan(config)
    files = weight_files(root)
    check_inventory(plan=plan, tensors=inventory(files), folder=root)
    return MolmoCheckpoint(folder=root, config=config, plan=plan, files=files)


def molmo_tokenizer(checkpoint: MolmoCheckpoint) -> Tokenizer:
    """The folder's tokenizer, with Molmo's image tokens added after its vocabulary if it lacks them."""
    tokenizer = Tokenizer.from_file(str(checkpoint.folder / TOKENIZER_FILE))
    if tokenizer.token_to_id(MOLMO_EXTRA_TOKENS[0]) is None:
        base = tokenizer.get_vocab_size(with_added_tokens=True)
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MOLMO_EXTRA_TOKENS])
        got = [tokenizer.token_to_id(t) for t in MOLMO_EXTRA_TOKENS]
        if got != list(range(base, base + len(MOLMO_EXTRA_TOKENS))):
            raise CheckpointError(f"cannot place Molmo's image tokens after the tokenizer's {base} tokens")
    embeddings = checkpoint.config.vocab_size + checkpoint.config.extra_embeddings
    too_big = [t for t in MOLMO_EXTRA_TOKENS if tokenizer.token_to_id(t) >= embeddings]
    if too_big:
        raise CheckpointError(f"tokenizer token(s) {', '.join(too_big)} have ids beyond the {embeddings} embeddings")
    return tokenizer


def load_molmo_checkpoint(checkpoint: MolmoCheckpoint, *, device: str | torch.device, dtype: torch.dtype,
                          attn_implementation: str = "sdpa",
                          experts_implementation: str = "grouped_mm") -> tuple[FlexMoeModel, Tokenizer]:
    """The model with every weight from the folder (cast to ``dtype`` on ``device``) and its tokenizer."""
    tokenizer = molmo_tokenizer(checkpoint)
    with torch.device("meta"), default_dtype(dtype):
        model = FlexMoeModel(checkpoint.config, attn_implementation=attn_implementation,
                             experts_implementation=experts_implementation)
    model = model.to_empty(device=device)
    state = dict(model.named_parameters())
    planned = {w.target for source in checkpoint.plan.values() for w in source.writes}
    unplanned = [k for k in state if k not in planned]
    if unplanned:     # a model part the plan does not fill would stay random
        raise CheckpointError(f"no checkpoint tensor fills {', '.join(unplanned[:3])}")
    done: set[str] = set()
    with torch.no_grad():
        for name, tensor in _iter_tensors(checkpoint.files, device=device):
            canonical = _canonical(name)
            for write in checkpoint.plan[canonical].writes:
                value = write.transform(tensor) if write.transform is not None else tensor
                target = state[write.target].data
                (target[write.index] if write.index else target).copy_(value.to(dtype))
            done.add(canonical)
    missing = [n for n in checkpoint.plan if n not in done]
    if missing:
        raise CheckpointError(f"checkpoint '{checkpoint.folder}' did not provide {', '.join(missing[:3])}")
    _reset_nonpersistent_buffers(model, device=device)
    return model.eval(), tokenizer


def weights_digest(checkpoint: MolmoCheckpoint) -> str:
    """sha256 over the weight files' bytes (in name order): the weights' identity."""
    digest = hashlib.sha256()
    for path in checkpoint.files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
