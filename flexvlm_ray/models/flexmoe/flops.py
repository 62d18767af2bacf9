"""Analytic FLOPs of a flexmoe model per stage (a multiply-add counts as 2 FLOPs).

Counted: matrix multiplies of every linear layer, attention scores (Q K^T) and the weighted sum
of values, the MoE router and only the ``top_k`` experts a token is routed to, only the decoder
blocks that run, and the LM head once per position that produces a token. Not counted:
normalizations, activations, softmax, rotary embeddings, residual adds, embedding lookups and
biases (all linear in the width, small next to the matmuls).

* vision: per crop, the patch embedding (a linear over 3*p*p pixels per patch) and every ViT layer
  over ``N = patches + 1`` tokens (CLS included): q/k/v/o ``8 N d^2``, scores and values
  ``4 N^2 d`` (bidirectional), MLP ``4 N d f``.
* projector: per pooled token (every 2x2 window of every crop): q over the window mean
  ``2 Din Dp``, k and v over its 4 features ``16 Din Dp``, scores and values ``16 Dp``, output
  ``2 Dp^2``; SwiGLU projector ``4 Dp P + 2 P H``.
* llm_prefill: ``T`` prompt tokens, causal: the token at position ``t`` (1-based) attends to ``t``
  keys. Per active block and token: q/k/v/o ``8 H^2``, router ``2 H E``, experts
  ``k * 6 H I``; attention ``4 H t``. Plus the LM head for the last position (the first output
  token): ``2 H V``.
* llm_decode: output tokens ``2 .. n`` (token 1 comes from prefill); step ``j`` (1-based) feeds
  one token at context ``T + j`` keys, then the LM head.
"""
from __future__ import annotations

from flexvlm_ray.models.flexmoe.config import FlexMoeConfig


def vision_flops(*, config: FlexMoeConfig, num_crops: int) -> float:
    c = config
    patches = c.patches_per_side ** 2
    n, d, f = patches + 1, c.vit_hidden, c.vit_intermediate
    embed = 2 * patches * (3 * c.vit_patch_px ** 2) * d
    layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * f
    return float(num_crops * (embed + c.vit_layers * layer))


def projector_flops(*, config: FlexMoeConfig, num_crops: int) -> float:
    c = config
    din, dp, p, h = c.vit_hidden * len(c.vit_feature_layers), c.pool_dim, c.projector_hidden, c.hidden_size
    per_token = 2 * din * dp + 16 * din * dp + 16 * dp + 2 * dp * dp + 4 * dp * p + 2 * p * h
    return float(num_crops * c.tokens_per_crop * per_token)


def decoder_token_flops(*, config: FlexMoeConfig, top_k: int, num_active_blocks: int) -> float:
    """FLOPs of one token through the active blocks, without attention over the context."""
    c = config
    h = c.hidden_size
    block = 8 * h * h + 2 * h * c.num_experts + top_k * 6 * h * c.expert_width
    return float(num_active_blocks * block)


def attention_context_flops(*, config: FlexMoeConfig, num_active_blocks: int, keys: int) -> float:
    """Scores and values of one query over ``keys`` keys, over the active blocks."""
    return float(num_active_blocks * 4 * config.hidden_size * keys)


def llm_prefill_flops(*, config: FlexMoeConfig, num_tokens: int, top_k: int, num_active_blocks: int) -> float:
    c, t = config, num_tokens
    per_token = decoder_token_flops(config=c, top_k=top_k, num_active_blocks=num_active_blocks)
    attention = attention_context_flops(config=c, num_active_blocks=num_active_blocks, keys=t * (t + 1) // 2)
    return float(t * per_token + attention + 2 * c.hidden_size * c.vocab_size)


def llm_decode_flops(*, config: FlexMoeConfig, num_prompt_tokens: int, num_output_tokens: int, top_k: int,
                     num_active_blocks: int) -> float:
    c = config
    steps = max(0, num_output_tokens - 1)
    per_token = decoder_token_flops(config=c, top_k=top_k, num_active_blocks=num_active_blocks)
    keys = sum(num_prompt_tokens + j for j in range(1, steps + 1))
    attention = attention_context_flops(config=c, num_active_blocks=num_active_blocks, keys=keys)
    return float(steps * (per_token + 2 * c.hidden_size * c.vocab_size) + attention)


def flexmoe_flops(*, config: FlexMoeConfig, num_crops: int, num_prompt_tokens: int, num_output_tokens: int,
                  top_k: int, num_active_blocks: int) -> dict[str, float]:
    """FLOPs per stage: vision, projector, llm_prefill, llm_decode."""
    return {
        "vision": vision_flops(config=config, num_crops=num_crops),
        "projector": projector_flops(config=config, num_crops=num_crops),
        "llm_prefill": llm_prefill_flops(config=config, num_tokens=num_prompt_tokens, top_k=top_k,
                                         num_active_blocks=num_active_blocks),
        "llm_decode": llm_decode_flops(config=config, num_prompt_tokens=num_prompt_tokens,
                                       num_output_tokens=num_output_tokens, top_k=top_k,
                                       num_active_blocks=num_active_blocks),
    }
