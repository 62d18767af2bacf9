"""Analytic FLOPs of a Qwen3-VL-MoE model per stage (a multiply-add counts as 2 FLOPs).

Same conventions as ``flexmoe_flops``: matrix multiplies of every linear layer, attention scores
(Q K^T) and the weighted sum of values, the router and only the ``top_k`` experts a token is routed
to, only the decoder blocks that run, the LM head once per position that produces a token. Not
counted: normalizations, activations, softmax, rotary embeddings, the position-embedding
interpolation, DeepStack additions, residual adds, embedding lookups and biases.

Symbols: an image of ``grid_thw = (t, h, w)`` patches, ``N = t h w``; vision width ``d``, MLP width
``f``, ``depth`` blocks, patch ``p``, temporal patch ``tp``, merge ``m``, merger output ``out``;
decoder width ``H``, ``nh`` query heads and ``nkv`` key/value heads of ``hd``, ``E`` experts of width
``I`` (dense blocks: MLP width ``Id``), vocab ``V``.

* vision: patch embedding ``2 N (3 tp p^2) d``; per block q/k/v/o ``8 N d^2``, scores and values
  ``4 t (h w)^2 d`` (each frame attends within itself, bidirectionally), MLP ``4 N d f``.
* projector: ``N / m^2`` merged tokens through the patch merger and each DeepStack merger, each an
  MLP ``D -> D -> out`` with ``D = d m^2``: ``2 D^2 + 2 D out`` per token and merger.
* llm_prefill: ``T`` prompt tokens, causal: the token at position ``t`` (1-based) attends to ``t``
  keys. Per active block and token: q/k/v/o ``4 H hd (nh + nkv)``; a sparse block adds the router
  ``2 H E`` and ``top_k * 6 H I``, a dense block ``6 H Id``; attention ``4 nh hd`` per key. Plus the
  LM head for the last position: ``2 H V``.
* llm_decode: output tokens ``2 .. n`` (token 1 comes from prefill); step ``j`` (1-based) feeds one
  token at ``T + j`` keys, then the LM head.

Which blocks are sparse follows the model: not in ``mlp_only_layers``, ``num_experts > 0`` and
``(index + 1) % decoder_sparse_step == 0``.
"""
from __future__ import annotations

from typing import Any, Sequence


def is_sparse(*, text: Any, index: int) -> bool:
    """Whether decoder block ``index`` is an MoE block (the model's own rule)."""
    return (index not in (text.mlp_only_layers or []) and text.num_experts > 0
            and (index + 1) % text.decoder_sparse_step == 0)


def vision_flops(*, vision: Any, grid_thw: Sequence[int]) -> float:
    t, h, w = (int(x) for x in grid_thw)
    n, d, f = t * h * w, vision.hidden_size, vision.intermediate_size
    embed = 2 * n * (vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2) * d
    block = 8 * n * d * d + 4 * t * (h * w) ** 2 * d + 4 * n * d * f
    return float(embed + vision.depth * block)


def projector_flops(*, vision: Any, grid_thw: Sequence[int]) -> float:
    t, h, w = (int(x) for x in grid_thw)
    m = vision.spatial_merge_size
    merged, dim = t * h * w // (m * m), vision.hidden_size * m * m
    mergers = 1 + len(vision.deepstack_visual_indexes)
    return float(mergers * merged * (2 * dim * dim + 2 * dim * vision.out_hidden_size))


def block_token_flops(*, text: Any, index: int, top_k: int) -> float:
    """One token through decoder block ``index``, without attention over the context."""
    h, hd = text.hidden_size, text.head_dim
    attention = 4 * h * hd * (text.num_attention_heads + text.num_key_value_heads)
    if is_sparse(text=text, index=index):
        return float(attention + 2 * h * text.num_experts + top_k * 6 * h * text.moe_intermediate_size)
    return float(attention + 6 * h * text.intermediate_size)


def _per_token(*, text: Any, blocks: Sequence[int], top_k: int) -> float:
    return sum(block_token_flops(text=text, index=i, top_k=top_k) for i in blocks)


def _attention(*, text: Any, num_blocks: int, keys: int) -> float:
    return float(num_blocks * 4 * text.num_attention_heads * text.head_dim * keys)


def llm_prefill_flops(*, text: Any, num_tokens: int, top_k: int, blocks: Sequence[int]) -> float:
    t = num_tokens
    attention = _attention(text=text, num_blocks=len(blocks), keys=t * (t + 1) // 2)
    return float(t * _per_token(text=text, blocks=blocks, top_k=top_k) + attention
                 + 2 * text.hidden_size * text.vocab_size)


def llm_decode_flops(*, text: Any, num_prompt_tokens: int, num_output_tokens: int, top_k: int,
                     blocks: Sequence[int]) -> float:
    steps = max(0, num_output_tokens - 1)
    keys = sum(num_prompt_tokens + j for j in range(1, steps + 1))
    per_step = _per_token(text=text, blocks=blocks, top_k=top_k) + 2 * text.hidden_size * text.vocab_size
    return float(steps * per_step + _attention(text=text, num_blocks=len(blocks), keys=keys))


def qwen3_vl_moe_flops(*, config: Any, grid_thw: Sequence[int], num_prompt_tokens: int, num_output_tokens: int,
                       top_k: int, blocks: Sequence[int]) -> dict[str, float]:
    """FLOPs per stage: vision, projector, llm_prefill, llm_decode (``config``: a Qwen3VLMoeConfig)."""
    vision, text = config.vision_config, config.text_config
    return {
        "vision": vision_flops(vision=vision, grid_thw=grid_thw),
        "projector": projector_flops(vision=vision, grid_thw=grid_thw),
        "llm_prefill": llm_prefill_flops(text=text, num_tokens=num_prompt_tokens, top_k=top_k, blocks=blocks),
        "llm_decode": llm_decode_flops(text=text, num_prompt_tokens=num_prompt_tokens,
                                       num_output_tokens=num_output_tokens, top_k=top_k, blocks=blocks),
    }
