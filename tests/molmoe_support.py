"""A MolmoE checkpoint folder at tiny dimensions, in the released layout (../shared/MOLMOE_CHECKPOINT.md):
the same tensor names with shapes scaled down, bf16 weights in safetensors shards with their index,
config.json (model_type 'molmo', sizes under the same keys), preprocessor_config.json and a small
tokenizer.json whose image tokens sit after ``vocab_size``; and an independent reference forward of
such a checkpoint written from the documented semantics with plain torch ops on the raw tensors."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

WORDS = ["<unk>", "<|padding|>", "user", ":", "assistant", "what", "color", "is", "the", "car", "?", "red",
         "green", "blue", "a", "dog", "how", "many", "are", "there", "one", "two", "describe", "image", "."]
BASE_VOCAB = len(WORDS) + 1              # + <|endoftext|>, the last base token
EXTRA = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
EMBEDDING_SIZE = 40                      # >= BASE_VOCAB + len(EXTRA); the head's rows
ADDITIONAL = 8                           # new_embedding rows

CONFIG = {
    "model_type": "molmo", "architectures": ["OLMoForCausalLM"],
    "auto_map": {"AutoConfig": "config_molmoe.MolmoConfig", "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM"},
    "block_type": "moe", "moe_mlp_impl": "sparse", "transformers_version": "4.45.0.dev0",
    "d_model": 32, "n_heads": 4, "n_kv_heads": None, "n_layers": 3, "mlp_ratio": 1, "mlp_hidden_size": None,
    "moe_num_experts": 6, "moe_top_k": 3, "activation_type": "swiglu", "layer_norm_eps": 1e-5,
    "attention_layer_norm": True, "rope_theta": 10000.0, "include_bias": False, "vocab_size": BASE_VOCAB,
    "embedding_size": EMBEDDING_SIZE, "additional_vocab_size": ADDITIONAL, "weight_tying": False,
    "layer_norm_type": "rms", "rope_impl": "llama", "rope_full_precision": True, "float32_attention": True,
    "residual_dropout": 0.1, "pad_token_id": 1, "use_col_tokens": True, "message_formatting": "role",
    "always_start_with_space": True, "max_crops": 6, "crop_mode": "overlap-and-resize-c2",
    "overlap_margins": [2, 2], "vit_layers": [-2, -3], "image_pooling_2d": "attention-meanq",
    "image_projector": "mlp", "image_padding_embed": "pad_and_partial_pad", "use_cls_feature": False,
    "max_sequence_length": 1024,
    "vision_backbone": {
        "image_model_type": "openai", "image_default_input_size": [32, 32], "image_patch_size": 4,
        "image_pos_patch_size": 4, "image_emb_dim": 16, "image_num_heads": 2, "image_num_key_value_heads": 2,
        "image_head_dim": 8, "image_mlp_dim": 24, "image_mlp_activations": "quick_gelu", "image_num_layers": 3,
        "image_num_pos": 65, "image_norm_eps": 1e-5},
}
PREPROCESSOR = {"base_image_input_size": [32, 32], "image_patch_size": 4, "image_token_length_h": 4,
                "image_token_length_w": 4, "max_crops": 6, "overlap_margins": [2, 2], "image_padding_mask": True,
                "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}


def tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["<|endoftext|>"] = len(WORDS)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>",) + EXTRA])
    return tok


def tensor_shapes(config: dict = CONFIG) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, by the documented names, at the config's sizes."""
    c, vb = config, config["vision_backbone"]
    d, e, width = c["d_model"], c["moe_num_experts"], (c["mlp_ratio"] * c["d_model"]) // 2
    emb, mlp, p = vb["image_emb_dim"], vb["image_mlp_dim"], vb["image_patch_size"]
    feat = emb * len(c["vit_layers"])
    shapes = {"model.transformer.wte.embedding": (c["embedding_size"], d),
              "model.transformer.wte.new_embedding": (c["additional_vocab_size"], d),
              "model.transformer.ln_f.weight": (d,), "lm_head.weight": (c["embedding_size"], d)}
    for b in range(c["n_layers"]):
        t = f"model.transformer.blocks.{b}"
        shapes.update({f"{t}.attn.att_proj.weight": (3 * d, d), f"{t}.attn.attn_out.weight": (d, d),
                       f"{t}.attn.attn_norm.weight": (d,), f"{t}.attn.q_norm.weight": (d,),
                       f"{t}.attn.k_norm.weight": (d,), f"{t}.mlp.ff_norm.weight": (d,),
                       f"{t}.mlp.gate.weight": (e, d)})
        for x in range(e):
            shapes.update({f"{t}.mlp.experts.{x}.gate_proj.weight": (width, d),
                           f"{t}.mlp.experts.{x}.up_proj.weight": (width, d),
                           f"{t}.mlp.experts.{x}.down_proj.weight": (d, width)})
    v = "model.vision_backbone.image_vit"
    shapes.update({f"{v}.class_embedding": (emb,), f"{v}.positional_embedding": (vb["image_num_pos"], emb),
                   f"{v}.patch_embedding.weight": (emb, p * p * 3), f"{v}.pre_ln.weight": (emb,),
                   f"{v}.pre_ln.bias": (emb,)})
    for layer in range(vb["image_num_layers"]):
        r = f"{v}.transformer.resblocks.{layer}"
        for w in ("wq", "wk", "wv", "wo"):
            shapes.update({f"{r}.attention.{w}.weight": (emb, emb), f"{r}.attention.{w}.bias": (emb,)})
        shapes.update({f"{r}.feed_forward.w1.weight": (mlp, emb), f"{r}.feed_forward.w1.bias": (mlp,),
                       f"{r}.feed_forward.w2.weight": (emb, mlp), f"{r}.feed_forward.w2.bias": (emb,)})
        for n in ("attention_norm", "ffn_norm"):
            shapes.update({f"{r}.{n}.weight": (emb,), f"{r}.{n}.bias": (emb,)})
    b = "model.vision_backbone"
    shapes[f"{b}.pad_embed"] = (2, feat)
    for w in ("wq", "wk", "wv"):
        shapes.update({f"{b}.image_pooling_2d.{w}.weight": (emb, feat), f"{b}.image_pooling_2d.{w}.bias": (emb,)})
    shapes.update({f"{b}.image_pooling_2d.wo.weight": (emb, emb), f"{b}.image_pooling_2d.wo.bias": (emb,),
                   f"{b}.image_projector.w1.weight": (width, emb), f"{b}.image_projector.w3.weight": (width, emb),
                   f"{b}.image_projector.w2.weight": (d, width)})
    return shapes


def random_tensors(*, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes().items():
        if name.endswith(("norm.weight", "ln.weight", "ln_f.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * (0.5 if len(shape) == 1 else 1.0 / math.sqrt(shape[-1]))
        out[name] = t.to(dtype)
    return out


def write_checkpoint(folder: Path, *, tensors: Optional[dict[str, torch.Tensor]] = None, shards: int = 3,
                     config: Optional[dict] = None) -> Path:
    """The folder: config.json, preprocessor_config.json, tokenizer.json, ``shards`` safetensors shards
    with ``model.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors() if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps(config or CONFIG, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    tokenizer().save(str(folder / "tokenizer.json"))
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# -- the reference forward -------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """(..., Tq, D) x (..., Tk, D): softmax(q k^T / sqrt(hd)) v per head, written out."""
    *lead, tq, dim = q.shape
    hd = dim // heads
    split = lambda x: x.reshape(*x.shape[:-1], heads, hd).transpose(-3, -2)   # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        tk = k.shape[-2]
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ vh
    return out.transpose(-3, -2).reshape(*lead, tq, dim)


def reference_image_features(w: dict[str, torch.Tensor], *, pixels: torch.Tensor, image_masks: torch.Tensor,
                             config: dict = CONFIG) -> torch.Tensor:
    """(num_crops * pooled, d_model) from normalized crops (n, 3, H, W), as the released model computes them."""
    vb = config["vision_backbone"]
    p, emb, heads = vb["image_patch_size"], vb["image_emb_dim"], vb["image_num_heads"]
    n, _, hgt, wid = pixels.shape
    gh, gw = hgt // p, wid // p
    # the processor's patch layout: (n, patches, p * p * 3) in (dh, dw, c) order
    patches = pixels.permute(0, 2, 3, 1).reshape(n, gh, p, gw, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, -1)
    v = "model.vision_backbone.image_vit"
    x = patches @ w[f"{v}.patch_embedding.weight"].T
    x = torch.cat([w[f"{v}.class_embedding"].expand(n, 1, emb), x], dim=1) + w[f"{v}.positional_embedding"]
    x = F.layer_norm(x, (emb,), w[f"{v}.pre_ln.weight"], w[f"{v}.pre_ln.bias"], eps=1e-5)
    states = []
    for layer in range(vb["image_num_layers"]):
        r = f"{v}.transformer.resblocks.{layer}"
        lin = lambda t, name: t @ w[f"{r}.{name}.weight"].T + w[f"{r}.{name}.bias"]   # noqa: E731
        h = F.layer_norm(x, (emb,), w[f"{r}.attention_norm.weight"], w[f"{r}.attention_norm.bias"], eps=1e-5)
        x = x + lin(_mha(lin(h, "attention.wq"), lin(h, "attention.wk"), lin(h, "attention.wv"), heads, False),
                    "attention.wo")
        h = F.layer_norm(x, (emb,), w[f"{r}.ffn_norm.weight"], w[f"{r}.ffn_norm.bias"], eps=1e-5)
        h = lin(h, "feed_forward.w1")
        x = x + lin(h * torch.sigmoid(1.702 * h), "feed_forward.w2")
        states.append(x)
    feats = torch.cat([states[i][:, 1:] for i in config["vit_layers"]], dim=-1)     # CLS dropped
    valid = ~torch.all(pixels.reshape(n, -1) == -1, dim=1)
    feats = feats * valid[:, None, None]
    pad = w["model.vision_backbone.pad_embed"]
    all_pad = (image_masks == 0).float()[..., None]
    partial = ((image_masks < 1) & (image_masks != 0)).float()[..., None]
    feats = feats + pad[0] * all_pad + pad[1] * partial
    # 2x2 windows, query = window mean
    dim = feats.shape[-1]
    win = feats.reshape(n, gh // 2, 2, gw // 2, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, dim)
    b = "model.vision_backbone.image_pooling_2d"
    lin = lambda t, name: t @ w[f"{b}.{name}.weight"].T + w[f"{b}.{name}.bias"]   # noqa: E731
    pooled = lin(_mha(lin(win.mean(1, keepdim=True), "wq"), lin(win, "wk"), lin(win, "wv"), heads, False), "wo")[:, 0]
    j = "model.vision_backbone.image_projector"
    return (F.silu(pooled @ w[f"{j}.w1.weight"].T) * (pooled @ w[f"{j}.w3.weight"].T)) @ w[f"{j}.w2.weight"].T


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama-style rotary embedding over the last dim of (heads, T, hd)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = positions[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
    return x * cos + rot * sin


def reference_logits(w: dict[str, torch.Tensor], *, input_ids: list[int], image_features: torch.Tensor,
                     image_input_idx: list[tuple[int, int]], top_k: int, blocks: Optional[list[int]] = None,
                     config: dict = CONFIG) -> torch.Tensor:
    """Logits of the last position: embeddings (embedding + new_embedding rows) with image features
    *added* at ``image_input_idx`` ((feature row, sequence position) pairs), the chosen blocks
    (attention with full-width q/k norms and RoPE; softmax router, top-k without renormalisation,
    SwiGLU experts), the final norm and the untied head."""
    c = config
    d, heads, eps = c["d_model"], c["n_heads"], c["layer_norm_eps"]
    table = torch.cat([w["model.transformer.wte.embedding"], w["model.transformer.wte.new_embedding"]])
    x = table[torch.tensor(input_ids)].clone()
    for row, pos in image_input_idx:
        x[pos] = x[pos] + image_features[row]
    t = x.shape[0]
    positions = torch.arange(t)
    for b in (range(c["n_layers"]) if blocks is None else blocks):
        p = f"model.transformer.blocks.{b}"
        h = _rms(x, w[f"{p}.attn.attn_norm.weight"], eps)
        q, k, v = (h @ w[f"{p}.attn.att_proj.weight"].T).split(d, dim=-1)
        q, k = _rms(q, w[f"{p}.attn.q_norm.weight"], eps), _rms(k, w[f"{p}.attn.k_norm.weight"], eps)
        hd = d // heads
        split = lambda z: z.reshape(t, heads, hd).transpose(0, 1)   # noqa: E731
        qh, kh = _rope(split(q), positions, c["rope_theta"]), _rope(split(k), positions, c["rope_theta"])
        merged = lambda z: z.transpose(0, 1).reshape(t, d)            # noqa: E731
        att = _mha(merged(qh), merged(kh), v, heads, True)
        x = x + att @ w[f"{p}.attn.attn_out.weight"].T
        h = _rms(x, w[f"{p}.mlp.ff_norm.weight"], eps)
        probs = (h @ w[f"{p}.mlp.gate.weight"].T).softmax(-1)
        weights, chosen = probs.topk(top_k, dim=-1)                 # no renormalisation
        out = torch.zeros_like(x)
        for tok in range(t):
            for wt, e in zip(weights[tok], chosen[tok]):
                ex = f"{p}.mlp.experts.{int(e)}"
                g = h[tok] @ w[f"{ex}.gate_proj.weight"].T
                u = h[tok] @ w[f"{ex}.up_proj.weight"].T
                out[tok] += wt * ((F.silu(g) * u) @ w[f"{ex}.down_proj.weight"].T)
        x = x + out
    return _rms(x[-1], w["model.transformer.ln_f.weight"], eps) @ w["lm_head.weight"].T
