"""A tiny fake *remote-code* Molmo checkpoint, written into a folder for the ``molmo_remote`` tests.

The folder holds what a hub checkpoint with custom code holds: ``config.json`` whose ``auto_map``
names ``configuration_fakemolmo.FakeMolmoConfig`` and ``modeling_fakemolmo.FakeMolmoForCausalLM``,
those two Python files, ``preprocessor_config.json`` with Molmo's key names, a tokenizer and the
weights. The model mirrors the module layout and call conventions of Molmo's remote code (as far as
the public ports show): ``model.transformer`` is a ModuleDict of ``wte``, ``blocks``, ``ln_f``,
``ff_out``; a block is called ``block(x, attention_bias=..., position_ids=..., layer_past=...,
use_cache=...) -> (x, (k, v))`` and slices the full causal bias itself; ``model.vision_backbone`` has
``encode_image(images)`` and ``forward(images, image_masks) -> (features, cls)``; image features are
added to the token embeddings at ``image_input_idx``. It is small, random and CPU-only, and it is
not Molmo: the ViT, pooling and MoE are minimal stand-ins. Its MoE is either a router module with a
plain ``top_k`` attribute (``moe_impl: router``, the default) or, with ``moe_impl: released``, the
layout of MolmoE's released ``modeling_molmoe.py``: ``block.mlp`` is one module holding ``top_k``
(read at every forward), ``ff_norm``, a ``gate`` Linear and an ``experts`` ModuleList of SwiGLU
MLPs (``gate_proj``, ``up_proj``, ``down_proj``), softmax then top-k without renormalisation, and
it returns ``(out, router_logits)``.
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIGURATION = '''
from transformers import PretrainedConfig


class FakeMolmoConfig(PretrainedConfig):
    model_type = "fake_molmo"

    def __init__(self, d_model=64, n_layers=4, n_heads=4, moe_num_experts=8, moe_top_k=2, expert_width=32,
                 vocab_size=512, embedding_size=528, vit_hidden=32, vit_layers=2, vit_heads=2, image_patch_size=14,
                 crop_px=168, max_position_embeddings=4096, rope_theta=10000.0, moe_impl="router", **kwargs):
        self.moe_impl = moe_impl
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.moe_num_experts, self.moe_top_k, self.expert_width = moe_num_experts, moe_top_k, expert_width
        self.vocab_size, self.embedding_size = vocab_size, embedding_size
        self.vit_hidden, self.vit_layers, self.vit_heads = vit_hidden, vit_layers, vit_heads
        self.image_patch_size, self.crop_px = image_patch_size, crop_px
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, rope_theta
        super().__init__(**kwargs)
'''

MODELING = '''
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_fakemolmo import FakeMolmoConfig


def _param(*shape):
    return nn.Parameter(torch.randn(*shape) * 0.02)


class RMSNorm(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def causal_attention_bias(seq_len, device):
    bias = torch.triu(torch.ones(seq_len, seq_len, device=device), diagonal=1)
    return bias.masked_fill(bias == 1, torch.finfo(bias.dtype).min).view(1, 1, seq_len, seq_len)


def rotate(x, position_ids, theta):
    dim = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float) / dim))
    freqs = position_ids[..., None].float() * inv                    # (B, T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]                 # (B, 1, T, dim)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return (x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()).to(x.dtype)


class VitBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.vit_heads
        self.norm1, self.norm2 = nn.LayerNorm(c.vit_hidden), nn.LayerNorm(c.vit_hidden)
        self.qkv, self.proj = nn.Linear(c.vit_hidden, 3 * c.vit_hidden), nn.Linear(c.vit_hidden, c.vit_hidden)
        self.fc1, self.fc2 = nn.Linear(c.vit_hidden, 2 * c.vit_hidden), nn.Linear(2 * c.vit_hidden, c.vit_hidden)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        patches = (c.crop_px // c.image_patch_size) ** 2
        self.patch_embedding = nn.Linear(3 * c.image_patch_size ** 2, c.vit_hidden)
        self.positional_embedding = _param(patches, c.vit_hidden)
        self.resblocks = nn.ModuleList([VitBlock(c) for _ in range(c.vit_layers)])

    def forward(self, x):
        x = self.patch_embedding(x) + self.positional_embedding[None]
        hidden = []
        for block in self.resblocks:
            x = block(x)
            hidden.append(x)
        return hidden


class VisionBackbone(nn.Module):
    """Molmo-like: features of the last two ViT layers, 2x2 attention pooling (query = window mean), MLP."""

    def __init__(self, c):
        super().__init__()
        self.per_side = c.crop_px // c.image_patch_size
        dim = 2 * c.vit_hidden
        self.image_vit = VisionTransformer(c)
        self.image_pooling_2d = nn.ModuleDict(dict(wq=nn.Linear(dim, dim), wk=nn.Linear(dim, dim),
                                                   wv=nn.Linear(dim, dim), wo=nn.Linear(dim, dim)))
        self.image_projector = nn.Sequential(nn.Linear(dim, 2 * c.d_model), nn.SiLU(), nn.Linear(2 * c.d_model, c.d_model))

    def encode_image(self, images):
        b, crops, patches, pixels = images.shape
        hidden = self.image_vit(images.view(b * crops, patches, pixels))
        features = torch.cat([hidden[-1], hidden[-2]], dim=-1)
        return features.view(b, crops, patches, -1), None

    def forward(self, images, image_masks):
        b, crops = images.shape[:2]
        features, cls = self.encode_image(images)
        s, dim = self.per_side, features.shape[-1]
        windows = features.view(b * crops, s // 2, 2, s // 2, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, dim)
        pool = self.image_pooling_2d
        q, k, v = pool["wq"](windows.mean(1, keepdim=True)), pool["wk"](windows), pool["wv"](windows)
        pooled = pool["wo"](torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim), dim=-1) @ v)
        return self.image_projector(pooled).view(b, crops, (s // 2) ** 2, -1), cls


class Router(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.top_k, self.num_experts = c.moe_top_k, c.moe_num_experts
        self.weight = _param(c.moe_num_experts, c.d_model)

    def forward(self, x):
        probs = torch.softmax(F.linear(x, self.weight).float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        return (weights / weights.sum(-1, keepdim=True)).to(x.dtype), indices


class MoeFeedForward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate = Router(c)
        self.expert_gate_up = _param(c.moe_num_experts, 2 * c.expert_width, c.d_model)
        self.expert_down = _param(c.moe_num_experts, c.d_model, c.expert_width)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x)
        out = torch.zeros_like(x)
        for slot in range(indices.shape[-1]):
            gate, up = torch.einsum("tod,td->to", self.expert_gate_up[indices[:, slot]], x).chunk(2, dim=-1)
            out = out + weights[:, slot, None] * torch.einsum("tdi,ti->td", self.expert_down[indices[:, slot]],
                                                               F.silu(gate) * up)
        return out.view(shape)


class ExpertMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.d_model, c.expert_width, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.expert_width, bias=False)
        self.down_proj = nn.Linear(c.expert_width, c.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReleasedMoeBlock(nn.Module):
    """The released MolmoeSparseMoeBlock's layout: top_k read at every forward, no renormalisation."""

    def __init__(self, c):
        super().__init__()
        self.num_experts, self.top_k = c.moe_num_experts, c.moe_top_k
        self.gate = nn.Linear(c.d_model, c.moe_num_experts, bias=False)
        self.experts = nn.ModuleList([ExpertMLP(c) for _ in range(c.moe_num_experts)])
        self.ff_norm = RMSNorm(c.d_model)

    def forward(self, hidden_states):
        hidden_states = self.ff_norm(hidden_states)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        weights, selected = torch.topk(F.softmax(router_logits, dim=1, dtype=torch.float), self.top_k, dim=-1)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows, slot = torch.where(selected == e)
            if rows.numel():
                out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None])
        return out.view(shape), router_logits


class FakeMolmoBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.theta = c.n_heads, c.rope_theta
        self.attn_norm, self.ff_norm = RMSNorm(c.d_model), RMSNorm(c.d_model)
        self.att_proj = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.released = getattr(c, "moe_impl", "router") == "released"
        if self.released:
            self.mlp = ReleasedMoeBlock(c)
        else:
            self.ffn = MoeFeedForward(c)

    def forward(self, x, attention_bias=None, position_ids=None, drop_mask=None, layer_past=None, use_cache=False):
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for y in self.att_proj(self.attn_norm(x)).split(d, dim=-1))
        q, k = rotate(q, position_ids, self.theta), rotate(k, position_ids, self.theta)
        if layer_past is not None:
            k, v = torch.cat([layer_past[0], k], dim=-2), torch.cat([layer_past[1], v], dim=-2)
        present = (k, v) if use_cache else None
        key_len = k.shape[-2]
        bias = attention_bias[:, :, key_len - t: key_len, :key_len].to(q.dtype)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, d))
        if self.released:
            return x + self.mlp(x)[0], present
        return x + self.ffn(self.ff_norm(x)), present


class FakeMolmo(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.embedding_size, c.d_model),
            blocks=nn.ModuleList([FakeMolmoBlock(c) for _ in range(c.n_layers)]),
            ln_f=RMSNorm(c.d_model), ff_out=nn.Linear(c.d_model, c.embedding_size, bias=False)))
        self.vision_backbone = VisionBackbone(c)

    def forward(self, input_ids, images=None, image_masks=None, image_input_idx=None, position_ids=None,
                past_key_values=None, use_cache=False):
        x = self.transformer.wte(input_ids)
        b, t = input_ids.shape
        if images is not None:
            features, _ = self.vision_backbone(images, image_masks)
            features = features.reshape(b, -1, features.shape[-1])
            index = image_input_idx.reshape(b, -1)
            valid = index >= 0
            rows = torch.arange(b, device=x.device).repeat_interleave(valid.sum(1))
            x = x.clone()
            x[rows, index[valid]] += features[valid].to(x.dtype)
        past = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device)[None]
        bias = causal_attention_bias(past + t, x.device)
        presents = []
        for i, block in enumerate(self.transformer.blocks):
            x, present = block(x, attention_bias=bias, position_ids=position_ids,
                               layer_past=None if past_key_values is None else past_key_values[i], use_cache=use_cache)
            presents.append(present)
        return self.transformer.ff_out(self.transformer.ln_f(x)), presents


class FakeMolmoForCausalLM(PreTrainedModel):
    config_class = FakeMolmoConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = FakeMolmo(config)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, images=None, image_masks=None, image_input_idx=None, position_ids=None,
                past_key_values=None, use_cache=False, **kwargs):
        logits, presents = self.model(input_ids, images=images, image_masks=image_masks,
                                      image_input_idx=image_input_idx, position_ids=position_ids,
                                      past_key_values=past_key_values, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=logits, past_key_values=presents if use_cache else None)
'''

PREPROCESSOR = {"base_image_input_size": [168, 168], "image_patch_size": 14, "max_crops": 8,
                "overlap_margins": [4, 4], "image_pooling_h": 2, "image_pooling_w": 2}
SPECIAL = ("[PAD]", "[UNK]", "<|endoftext|>")
IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")


def write_fake_molmo(folder: Path, *, seed: int = 0, moe_impl: str = "router") -> Path:
    """Write the code, config, tokenizer and random weights (``seed``) of the fake checkpoint
    (``moe_impl``: 'router' or 'released', see the module doc)."""
    import torch
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from flexvlm_ray.models.flexmoe.config import WORDS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_fakemolmo.py").write_text(CONFIGURATION)
    (folder / "modeling_fakemolmo.py").write_text(MODELING)
    config = {"model_type": "fake_molmo", "architectures": ["FakeMolmoForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_fakemolmo.FakeMolmoConfig",
                           "AutoModelForCausalLM": "modeling_fakemolmo.FakeMolmoForCausalLM"},
              "d_model": 64, "n_layers": 4, "n_heads": 4, "moe_num_experts": 8,
              "moe_top_k": 2, "expert_width": 32, "vocab_size": 512, "embedding_size": 528,
              "vit_hidden": 32, "vit_layers": 2, "vit_heads": 2, "image_patch_size": 14, "crop_px": 168,
              "moe_impl": moe_impl}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    tokens = list(SPECIAL) + list(WORDS)
    tokens += [f"[unused{i}]" for i in range(512 - len(tokens))] + list(IMAGE_TOKENS)
    tokens += [f"[extra{i}]" for i in range(528 - len(tokens))]
    tok = Tokenizer(WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL) + list(IMAGE_TOKENS))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(folder)
    loaded = AutoConfig.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(loaded, trust_remote_code=True)
    model.save_pretrained(folder)
    return folder
