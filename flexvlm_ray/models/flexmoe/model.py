"""The ``flexmoe`` network: CLIP ViT -> 2x2 attention pooling -> SwiGLU projector -> OLMoE decoder.

Built from transformers modules (``CLIPVisionModel``, ``OlmoeForCausalLM``) plus two small
connector modules written here, following Molmo's vision backbone:

* ``AttentionPool2x2`` ("attention-meanq"): every 2x2 window of ViT features (two ViT layers
  concatenated) is one attention query, the mean of the window, over its four features as keys
  and values; multi-head, with q/k/v/o projections (biases on).
* ``PadEmbed`` (``pad_embed`` configs, MolmoE's "pad_and_partial_pad"): ``weight[0]`` is added to
  the ViT features of patches whose image mask is 0 (all padding), ``weight[1]`` where it is below 1
  and not 0 (partly padding, or the -1 row Molmo's processor gives its last crop); crops whose pixels
  are all -1 (a batch's padding crops in Molmo) are zeroed first.
* ``ProjectorMLP``: ``w2(silu(w1 x) * w3 x)`` to the decoder hidden size (no biases); with
  ``projector_out_norm`` (the ``tiny`` preset) an RMSNorm follows, its scale initialised to the
  decoder's embedding init std, so image tokens enter the decoder at word-embedding scale.

MolmoE configs also replace the decoder's token embedding by one of ``vocab_size + extra_embeddings``
rows (the head keeps ``vocab_size``) and CLIP's post-layernorm by an identity (MolmoE has none).

``build_flexmoe`` creates the weights directly on the target device in the target dtype (under a
``torch.device`` context and a temporary default dtype), so the 7B model is never materialized on
the CPU. ``save_flexmoe`` / ``load_flexmoe`` write and read ``config.json``, ``tokenizer.json`` and
``model.safetensors``.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, OlmoeConfig, OlmoeForCausalLM

from flexvlm_ray.models.flexmoe.config import (BOS_ID, CONFIG_FILE, EOS_ID, PAD_ID, TOKENIZER_FILE, WEIGHTS_FILE,  # noqa: F401
                                              FlexMoeConfig, build_tokenizer, read_flexmoe_config)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AttentionPool2x2(nn.Module):
    """Molmo's 'attention-meanq' pooling of each 2x2 window of ViT patch features."""

    def __init__(self, *, in_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"pool dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.wq = nn.Linear(in_dim, dim)
        self.wk = nn.Linear(in_dim, dim)
        self.wv = nn.Linear(in_dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(num_windows, 4, in_dim) -> (num_windows, dim)."""
        n, w, _ = windows.shape
        split = lambda x: x.view(n, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)  # noqa: E731
        q = split(self.wq(windows.mean(dim=1, keepdim=True)))
        k, v = split(self.wk(windows)), split(self.wv(windows))
        out = F.scaled_dot_product_attention(q, k, v)          # (n, heads, 1, head_dim)
        return self.wo(out.transpose(1, 2).reshape(n, -1))


class PadEmbed(nn.Module):
    """MolmoE's padding embeddings, added to the ViT features by the per-patch image mask."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, features: torch.Tensor, *, image_masks: torch.Tensor,
                crop_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features (num_crops, patches, dim), image_masks (num_crops, patches), crop_valid (num_crops,) bool."""
        if crop_valid is not None:
            features = features * crop_valid.to(features.dtype)[:, None, None]
        all_pad = image_masks == 0
        partial = (image_masks < 1) & ~all_pad
        dtype = features.dtype
        return (features + self.weight[0].to(dtype) * all_pad[..., None].to(dtype)
                + self.weight[1].to(dtype) * partial[..., None].to(dtype))


class ProjectorMLP(nn.Module):
    """SwiGLU MLP from pooled features to the decoder hidden size."""

    def __init__(self, *, in_dim: int, hidden: int, out_dim: int, out_norm_scale: Optional[float] = None) -> None:
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w3 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)
        self.out_norm: Optional[nn.RMSNorm] = None
        if out_norm_scale is not None:
            self.out_norm = nn.RMSNorm(out_dim, eps=1e-6)
            nn.init.constant_(self.out_norm.weight, out_norm_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out if self.out_norm is None else self.out_norm(out)


def clip_config(config: FlexMoeConfig, *, attn_implementation: str) -> CLIPVisionConfig:
    c = config
    return CLIPVisionConfig(hidden_size=c.vit_hidden, intermediate_size=c.vit_intermediate,
                            num_hidden_layers=c.vit_layers, num_attention_heads=c.vit_heads,
                            image_size=c.crop_px, patch_size=c.vit_patch_px, hidden_act="quick_gelu",
                            attn_implementation=attn_implementation)


def olmoe_config(config: FlexMoeConfig, *, attn_implementation: str, experts_implementation: str) -> OlmoeConfig:
    c = config
    return OlmoeConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.expert_width,
                       num_hidden_layers=c.num_blocks, num_attention_heads=c.num_heads,
                       num_key_value_heads=c.kv_heads, num_experts=c.num_experts, num_experts_per_tok=c.top_k,
                       rms_norm_eps=c.rms_norm_eps,
                       max_position_embeddings=c.max_positions, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                       eos_token_id=EOS_ID, norm_topk_prob=False, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                       attn_implementation=attn_implementation, experts_implementation=experts_implementation)


class FlexMoeModel(nn.Module):
    """The whole VLM; the adapter drives its parts stage by stage."""

    def __init__(self, config: FlexMoeConfig, *, attn_implementation: str = "sdpa",
                 experts_implementation: str = "grouped_mm") -> None:
        super().__init__()
        self.config = config
        c = config
        self.vision = CLIPVisionModel(clip_config(c, attn_implementation=attn_implementation))
        self.pool = AttentionPool2x2(in_dim=c.vit_hidden * len(c.vit_feature_layers), dim=c.pool_dim,
                                     heads=c.pool_heads)
        decoder_config = olmoe_config(c, attn_implementation=attn_implementation,
                                      experts_implementation=experts_implementation)
        self.projector = ProjectorMLP(in_dim=c.pool_dim, hidden=c.projector_hidden, out_dim=c.hidden_size,
                                      out_norm_scale=decoder_config.initializer_range if c.projector_out_norm
                                      else None)
        self.decoder = OlmoeForCausalLM(decoder_config)
        self.pad: Optional[PadEmbed] = None
        if c.pad_embed:
            self.pad = PadEmbed(dim=c.vit_hidden * len(c.vit_feature_layers))
        if c.extra_embeddings:
            self.decoder.model.embed_tokens = nn.Embedding(c.vocab_size + c.extra_embeddings, c.hidden_size,
                                                           padding_idx=decoder_config.pad_token_id)
        if not c.vit_post_layernorm:
            self.vision.post_layernorm = nn.Identity()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.model.layers

    def connector_modules(self) -> list[nn.Module]:
        return [self.pool, self.projector] + ([self.pad] if self.pad is not None else [])

    def encode_crops(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_crops, patches, vit_hidden * 2): two ViT layers' patch features, CLS dropped."""
        hidden = self.vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return torch.cat([hidden[layer][:, 1:] for layer in self.config.vit_feature_layers], dim=-1)

    def pool_and_project(self, features: torch.Tensor, *, image_masks: Optional[torch.Tensor] = None,
                         crop_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(num_crops * tokens_per_crop, hidden): padding embeddings (``pad_embed`` configs), 2x2
        attention pooling of every window, then the MLP."""
        if self.pad is not None:
            if image_masks is None:
                raise ValueError("this model adds padding embeddings: pool_and_project needs image_masks")
            features = self.pad(features, image_masks=image_masks, crop_valid=crop_valid)
        n, _, dim = features.shape
        p = self.config.pooled_per_side
        windows = features.view(n, p, 2, p, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(n * p * p, 4, dim)
        return self.projector(self.pool(windows))


def splice_image_embeds(*, hidden: torch.Tensor, row: int, embeds: torch.Tensor, positions: torch.Tensor,
                        feature_index: torch.Tensor) -> None:
    """Write the pooled image features (in sequence order) into the ``[IMG]`` positions of one row."""
    hidden[row, positions] = embeds[feature_index].to(hidden.dtype)


def add_image_embeds(*, hidden: torch.Tensor, row: int, embeds: torch.Tensor, positions: torch.Tensor,
                     feature_index: torch.Tensor) -> None:
    """Add the pooled image features (in sequence order) to the embeddings at the image positions (MolmoE)."""
    hidden[row, positions] += embeds[feature_index].to(hidden.dtype)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_flexmoe(config: FlexMoeConfig, *, device: str | torch.device, dtype: torch.dtype, seed: int,
                  attn_implementation: str = "sdpa", experts_implementation: str = "grouped_mm") -> FlexMoeModel:
    """Random weights (fixed seed) created on ``device`` in ``dtype``; eval mode."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = FlexMoeModel(config, attn_implementation=attn_implementation,
                             experts_implementation=experts_implementation)
    return model.eval()


def save_flexmoe(*, model: FlexMoeModel, tokenizer: Optional[Tokenizer], directory: str | os.PathLike) -> Path:
    """Write ``config.json``, ``tokenizer.json`` and ``model.safetensors`` (float32 weights) to a folder."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(model.config.to_json())
    (tokenizer or build_tokenizer(vocab_size=model.config.vocab_size)).save(str(out / TOKENIZER_FILE))
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    return out


def load_flexmoe(directory: str | os.PathLike, *, device: str | torch.device, dtype: torch.dtype,
                 attn_implementation: str = "sdpa",
                 experts_implementation: str = "grouped_mm") -> tuple[FlexMoeModel, Tokenizer]:
    """Model and tokenizer from a folder written by ``save_flexmoe`` (weights cast to ``dtype``)."""
    folder = Path(directory)
    config = read_flexmoe_config(folder)
    with torch.device("meta"), default_dtype(dtype):
        model = FlexMoeModel(config, attn_implementation=attn_implementation,
                             experts_implementation=experts_implementation)
    model = model.to_empty(device=device)
    state = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    # non-persistent buffers (rotary inv_freq, CLIP position ids) are not in the file: rebuild them
    _reset_nonpersistent_buffers(model, device=device)
    if unexpected or [k for k in missing if not _is_nonpersistent(model, k)]:
        raise ValueError(f"weights in '{folder}' do not match its config: missing {missing}, unexpected {unexpected}")
    return model.eval(), Tokenizer.from_file(str(folder / TOKENIZER_FILE))


def _is_nonpersistent(model: nn.Module, key: str) -> bool:
    module_name, _, buffer = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer in getattr(module, "_non_persistent_buffers_set", set())


def _reset_nonpersistent_buffers(model: FlexMoeModel, *, device: str | torch.device) -> None:
    """Recompute buffers that ``to_empty`` left uninitialized and ``state_dict`` does not hold.

    They are the decoder's rotary frequencies and CLIP's ``position_ids`` (an arange); where CLIP
    keeps that buffer moved between transformers versions, so it is found by name.
    """
    rotary = model.decoder.model.rotary_emb
    with torch.device(device):
        fresh = type(rotary)(config=model.decoder.config)
    for name, buf in fresh.named_buffers():
        getattr(rotary, name).copy_(buf)
    for name, buf in model.vision.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))
