"""Analytic FLOPs of a Molmo2 model per stage (a multiply-add counts as 2 FLOPs).

Conventions as in ``flexmoe_flops``: linear layers, attention scores and weighted values, only the
decoder blocks that run, the LM head once per position that produces a token; normalizations,
activations, softmax, rotary embeddings, residual adds, embedding lookups and biases not counted.

Symbols: ``crops`` crops of ``N`` patches of ``p`` px; ViT width ``d``, MLP ``f``, ``L`` layers (all run,
as in the model), ``nh``/``nkv`` heads of ``hd``; adapter input ``Din = d * len(vision_feature_layer)``,
``anh``/``ankv`` heads of ``ahd``, width ``A``, MLP ``Ai``, output ``H``; decoder width ``H``, heads
``nh``/``nkv`` of ``hd``, MLP ``I``, vocab ``V``.

* vision, per crop: patch embedding ``2 N (3 p^2) d``; per layer q/o ``2 * 2 N d (nh hd)``, k/v
  ``2 * 2 N d (nkv hd)``, scores and values ``4 N^2 nh hd`` (bidirectional), MLP ``4 N d f``.
* projector, per vision token (a pooling window of ``w`` slots, padded slots computed and masked):
  query from the window mean ``2 Din anh ahd``, keys and values ``2 * 2 w Din ankv ahd``, scores and
  values ``4 w anh ahd``, output ``2 anh ahd A``; SwiGLU ``4 A Ai + 2 Ai H``.
* llm_prefill: ``T`` prompt tokens; the mask is causal plus image tokens among themselves, so the
  attended keys are ``T (T + 1) / 2 + m (m - 1) / 2`` for ``m`` image tokens (patches and image
  special tokens). Per active block and token: q/k/v/o ``4 H hd (nh + nkv)``, MLP ``6 H I``;
  attention ``4 nh hd`` per key. Plus the LM head for the last position: ``2 H V``.
* llm_decode: output tokens ``2 .. n``; step ``j`` attends ``T + j`` keys, then the LM head.
"""
from __future__ import annotations

from typing import Any


def vision_flops(*, config: Any, num_crops: int, patches_per_crop: int) -> float:
    v = config.vision_config
    n, d = patches_per_crop, v.hidden_size
    embed = 2 * n * (v.num_channels * v.patch_size ** 2) * d
    projections = 4 * n * d * v.head_dim * (v.num_attention_heads + v.num_key_value_heads)
    layer = projections + 4 * n * n * v.num_attention_heads * v.head_dim + 4 * n * d * v.intermediate_size
    return float(num_crops * (embed + v.num_hidden_layers * layer))


def projector_flops(*, config: Any, num_tokens: int, window: int) -> float:
    a = config.adapter_config
    din = config.vision_config.hidden_size * len(a.vision_feature_layer)
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    pooling = 2 * din * q + 2 * 2 * window * din * kv + 4 * window * q + 2 * q * a.hidden_size
    mlp = 4 * a.hidden_size * a.intermediate_size + 2 * a.intermediate_size * a.text_hidden_size
    return float(num_tokens * (pooling + mlp))


def _block_token(text: Any) -> float:
    h = text.hidden_size
    return float(4 * h * text.head_dim * (text.num_attention_heads + text.num_key_value_heads)
                 + 6 * h * text.intermediate_size)


def _attention(text: Any, *, num_blocks: int, keys: int) -> float:
    return float(num_blocks * 4 * text.num_attention_heads * text.head_dim * keys)


def llm_prefill_flops(*, config: Any, num_tokens: int, num_image_tokens: int, num_active_blocks: int) -> float:
    text, t, m = config.text_config, num_tokens, num_image_tokens
    keys = t * (t + 1) // 2 + m * (m - 1) // 2
    return float(t * num_active_blocks * _block_token(text) + _attention(text, num_blocks=num_active_blocks, keys=keys)
                 + 2 * text.hidden_size * text.vocab_size)


def llm_decode_flops(*, config: Any, num_prompt_tokens: int, num_output_tokens: int, num_active_blocks: int) -> float:
    text = config.text_config
    steps = max(0, num_output_tokens - 1)
    keys = sum(num_prompt_tokens + j for j in range(1, steps + 1))
    per_step = num_active_blocks * _block_token(text) + 2 * text.hidden_size * text.vocab_size
    return float(steps * per_step + _attention(text, num_blocks=num_active_blocks, keys=keys))


def molmo2_flops(*, config: Any, num_crops: int, patches_per_crop: int, num_vision_tokens: int, window: int,
                 num_prompt_tokens: int, num_image_tokens: int, num_output_tokens: int,
                 num_active_blocks: int) -> dict[str, float]:
    """FLOPs per stage: vision, projector, llm_prefill, llm_decode (``config``: a Molmo2Config)."""
    return {
        "vision": vision_flops(config=config, num_crops=num_crops, patches_per_crop=patches_per_crop),
        "projector": projector_flops(config=config, num_tokens=num_vision_tokens, window=window),
        "llm_prefill": llm_prefill_flops(config=config, num_tokens=num_prompt_tokens, num_image_tokens=num_image_tokens,
                                         num_active_blocks=num_active_blocks),
        "llm_decode": llm_decode_flops(config=config, num_prompt_tokens=num_prompt_tokens,
                                       num_output_tokens=num_output_tokens, num_active_blocks=num_active_blocks),
    }
