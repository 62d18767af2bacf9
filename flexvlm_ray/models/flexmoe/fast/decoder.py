"""The ``fast`` backend of ``flexmoe``: an OLMoE decoder loop whose cost follows the knobs.

It runs on the very parameters of the transformers model (``OlmoeForCausalLM``), which already
stores its experts stacked (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``); the only
copy is the concatenated q/k/v weight of the Triton path. What differs from the ``hf`` path is how the
work is issued:

* **Static KV cache.** ``StaticKVCache`` preallocates keys and values as
  ``[num_blocks, kv_heads, max_len, head_dim]`` once; block ``b`` writes its own slice, skipped
  blocks leave theirs untouched. Prefill writes positions ``0..T-1``; a decode step writes one
  position taken from a device tensor (``index_copy_``) and attends (SDPA) over the first
  ``bucket`` cache positions (``bucket``: the context length rounded up to ``kv_bucket``) with a
  boolean mask ``arange(bucket) <= position`` built on the device, so one CUDA graph serves every
  step whose context falls in that bucket.
* **RoPE, norms, router** are computed exactly as OLMoE does (q/k RMSNorm over the full
  projection width before the head split, float32 RMSNorm statistics, softmax over all router
  logits in float32, ``topk``, no renormalization unless ``norm_topk_prob``).
* **MoE decode** (one token): ``gather``: the ``k`` chosen experts' weights are selected
  (``index_select`` on the stacked tensors) and multiplied with ``torch.bmm``, so the bytes read
  grow with ``k``; ``grouped``: the same ``k`` rows go through the grouped GEMM of the prefill
  path, which reads only the experts whose group is non-empty and copies no weights.
* **MoE prefill**: token-expert pairs are sorted by expert on the device (``sort_pairs``: a Triton
  counting sort, or torch.sort on uint8 keys); ``fused`` runs ``fused_ops.moe_experts`` (Triton GEMMs
  over expert-padded tiles that gather the token rows themselves, SiLU-mul in the first one's epilogue,
  weight tiles through TMA on Hopper; no host sync); ``grouped`` runs two grouped GEMMs
  (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``) with per-expert offsets computed
  on the device; ``loop`` runs one matmul per expert that received tokens (host sync on the counts).
* **CUDA graphs** (CUDA only): a decode step is captured lazily once per
  ``(active blocks, top_k per block, kv bucket)`` after two warm-up runs on a side stream, into
  one shared memory pool, and replayed; token and position enter through static device buffers,
  logits and the argmax leave through static buffers. A prefill is captured per
  ``(active blocks, top_k per block, prompt length padded to PREFILL_BUCKET)`` unless forward hooks
  time its blocks, and the ViT per crop count. On the CPU the same bodies run eagerly.
* **Triton kernels** (``kernels: triton``, ``decode_moe: fused``, ``prefill_moe: fused``;
  ``flexvlm_ray.models.flexmoe.fast.ops``):
  fused RMSNorm (with the residual add), q/k norm + RoPE written into the cache (with v), the router's
  softmax + top-k, the pair sort, SiLU-mul, the prefill MoE's weighted combine (with the residual), and
  the decode MoE as two GEMVs over the chosen experts; q, k and v weights are concatenated once so their
  projection is one GEMM.

``FastBlock`` and its ``attention`` / ``ffn`` parts are ``nn.Module`` objects called through
``__call__`` in eager runs (a prefill with hooks registered always runs eagerly), so the engine's
forward hooks time them.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flexvlm_ray.models.flexmoe.config import DECODE_MOE, KERNELS, PREFILL_MOE  # noqa: F401  (re-exported)
from flexvlm_ray.models.flexmoe.fast import ops as fused_ops

KV_BUCKET = 512
PREFILL_BUCKET = 128
GRAPH_WARMUP = 2
MAX_GRAPHS = 512         # captured graphs a decoder keeps (least recently used dropped beyond)


def grouped_mm_function() -> Optional[Callable[..., torch.Tensor]]:
    """``torch.nn.functional.grouped_mm`` (torch >= 2.10), else ``torch._grouped_mm``, else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_runs(*, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the grouped GEMM runs here for ``dtype`` (a two-expert product checked against a loop)."""
    mm = grouped_mm_function()
    if mm is None:
        return False
    try:
        a = torch.randn(4, 32, device=device).to(dtype)
        b = torch.randn(2, 64, 32, device=device).to(dtype)
        offs = torch.tensor([1, 4], dtype=torch.int32, device=device)
        out = mm(a, b.transpose(-2, -1), offs=offs)
        ref = torch.cat([a[:1] @ b[0].T, a[1:] @ b[1].T])
        return bool(torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """OLMoE's RMSNorm: statistics in float32, cast back, then the weight."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotary(*, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (T, head_dim) for integer ``positions`` (T,), as OLMoE computes them."""
    freqs = positions[:, None].float() * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (heads, T, head_dim) rotated by (T, head_dim) cos/sin."""
    return x * cos + rotate_half(x) * sin


# -- MoE -------------------------------------------------------------------------------------
def route(*, x: torch.Tensor, weight: torch.Tensor, top_k: int, norm_topk_prob: bool,
          kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMoE's router on (T, H): (weights (T, k) in the logits' dtype, expert ids (T, k)).

    ``kernel``: softmax, top-k and cast after the router GEMM as one Triton launch (``fused_ops.route``)."""
    logits = F.linear(x, weight)
    if kernel:
        return fused_ops.route(logits, top_k=top_k, norm_topk_prob=norm_topk_prob)
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w.to(logits.dtype), top_i


def experts_gather(*, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One token (1, H) through its ``k`` experts: weights of those experts only, batched matmuls.

    ``gate_up.index_select(0, ids)`` is ``(k, 2I, H)`` and ``down.index_select(0, ids)`` is
    ``(k, H, I)``; no other expert's weights are read.
    """
    k = ids.shape[-1]
    ids, weights = ids.reshape(k), weights.reshape(k)
    gu = gate_up.index_select(0, ids)                                  # (k, 2I, H)
    h = torch.bmm(gu, x.reshape(1, -1, 1).expand(k, -1, 1)).squeeze(-1)  # (k, 2I)
    gate, up = h.chunk(2, dim=-1)
    a = act(gate) * up                                                 # (k, I)
    dn = down.index_select(0, ids)                                     # (k, H, I)
    y = torch.bmm(dn, a.unsqueeze(-1)).squeeze(-1)                     # (k, H)
    return (y * weights[:, None]).sum(dim=0, keepdim=True).to(x.dtype)


def key_dtype(num_experts: int) -> torch.dtype:
    """The narrowest integer dtype holding expert ids ``0 .. num_experts - 1``."""
    if num_experts <= 256:
        return torch.uint8
    return torch.int16 if num_experts <= 1 << 15 else torch.int32


@dataclass(frozen=True)
class SortedPairs:
    """Token-expert pairs (pair ``p`` = token ``p // top_k``, slot ``p % top_k``) in expert order."""

    perm: torch.Tensor       # (S,) int64: the pair at each sorted position (stable: pair order within an expert)
    inverse: torch.Tensor    # (S,) int64: the sorted position of each pair
    tokens: torch.Tensor     # (S,) int64: the token at each sorted position (perm // top_k)
    offsets: torch.Tensor    # (E,) int32: where each expert's run ends (inclusive cumsum of the counts)


def sort_pairs(*, ids: torch.Tensor, num_experts: int, kernel: bool = False) -> SortedPairs:
    """The (T, k) router ids' pairs sorted by expert, on the device (no host sync).

    ``kernel``: one Triton counting-sort launch (``fused_ops.moe_sort``). Otherwise a stable ``torch.sort``
    on the narrowest integer keys that hold the ids (on CUDA, torch.sort hands the keys to cub's radix sort
    with ``end_bit = 8 * sizeof(key)``: uint8 keys take one 8-bit digit pass where int32 keys take four),
    a binary search per expert for the offsets, and a scatter for the inverse. Both give the same result.
    """
    if kernel:
        return SortedPairs(*fused_ops.moe_sort(ids, num_experts=num_experts))
    sorted_ids, perm = torch.sort(ids.reshape(-1).to(key_dtype(num_experts)), stable=True)
    bounds = torch.arange(num_experts, device=ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds, right=True, out_int32=True)
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    return SortedPairs(perm=perm, inverse=inverse, tokens=perm // ids.shape[1], offsets=offsets)


def _combine(*, y: torch.Tensor, pairs: SortedPairs, weights: torch.Tensor, residual: Optional[torch.Tensor],
             dtype: torch.dtype) -> torch.Tensor:
    """Put the sorted pairs' outputs back in (token, slot) order, weight them, sum over the slots
    (each product rounded to the model dtype, as OLMoE's experts loop rounds), add ``residual``."""
    num_tokens, top_k = weights.shape
    y = y[pairs.inverse] * weights.reshape(-1, 1)
    out = y.view(num_tokens, top_k, -1).sum(dim=1).to(dtype)
    return out if residual is None else residual + out


def experts_grouped(*, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor],
                    mm: Callable[..., torch.Tensor], fused: bool = False,
                    residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, H) through the experts with two grouped GEMMs; offsets stay on the device (no host sync).

    ``fused``: the pair sort, SiLU-and-multiply and the weighted sum over the slots (with the residual
    add) as Triton kernels (act must be SiLU). ``residual`` (T, H), if given, is added to the output.
    """
    pairs = sort_pairs(ids=ids, num_experts=gate_up.shape[0], kernel=fused)
    xs = x[pairs.tokens]
    h = mm(xs, gate_up.transpose(-2, -1), offs=pairs.offsets)               # (S, 2I)
    if fused:
        a = fused_ops.silu_mul(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        a = act(gate) * up
    y = mm(a, down.transpose(-2, -1), offs=pairs.offsets)                   # (S, H)
    if fused:
        return fused_ops.moe_combine(y=y, inverse=pairs.inverse, weights=weights, residual=residual)
    return _combine(y=y, pairs=pairs, weights=weights, residual=residual, dtype=x.dtype)


def experts_fused(*, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, config: Optional[fused_ops.MoeConfig] = None,
                  residual: Optional[torch.Tensor] = None, tma: Optional[bool] = None) -> torch.Tensor:
    """(T, H) through the experts as the Triton MoE of ``fused_ops.moe_experts`` (no host sync, SiLU only):
    token rows gathered inside the GEMM, no per-pair copy of ``x``; ``tma``: weight tiles through TMA
    descriptors (None: where they apply)."""
    pairs = sort_pairs(ids=ids, num_experts=gate_up.shape[0], kernel=True)
    return fused_ops.moe_experts(x=x, perm=pairs.perm, offsets=pairs.offsets, weights=weights, gate_up=gate_up,
                                 down=down, config=config, residual=residual, tma=tma)


def experts_loop(*, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor],
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, H) through the experts, one matmul pair per expert that received tokens (reads the counts)."""
    pairs = sort_pairs(ids=ids, num_experts=gate_up.shape[0])
    xs = x[pairs.tokens]
    counts = torch.diff(pairs.offsets, prepend=pairs.offsets.new_zeros(1)).tolist()
    y = torch.empty(xs.shape[0], down.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        seg = slice(start, start + n)
        gate, up = F.linear(xs[seg], gate_up[expert]).chunk(2, dim=-1)
        y[seg] = F.linear(act(gate) * up, down[expert])
        start += n
    return _combine(y=y, pairs=pairs, weights=weights, residual=residual, dtype=x.dtype)


def check_kernels(*, kernels: str, decode_moe: str, prefill_moe: str, device: torch.device,
                  act: Callable[..., Any]) -> None:
    """Refuse a Triton path that cannot run here, or whose kernels would compute something else."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r} is not one of {', '.join(KERNELS)}")
    if kernels != "triton" and decode_moe != "fused" and prefill_moe != "fused":
        return
    if not fused_ops.runs_on(device):
        why = "Triton is not installed" if fused_ops.triton is None else f"Triton does not run on {device}"
        raise ValueError(f"kernels 'triton', decode_moe 'fused' and prefill_moe 'fused' need Triton on CUDA ({why}); "
                         f"use kernels 'torch' with decode_moe 'grouped' or 'gather' and prefill_moe 'grouped' "
                         f"or 'loop'")
    if type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"the Triton experts kernels compute SiLU; this model's activation is {type(act).__name__}")


def check_fused_decode(*, causal_lm: nn.Module, kernels: str, decode_moe: str) -> None:
    """``fused_decode`` runs the Triton kernels and the fused decode MoE on bias-free, unclipped projections."""
    if kernels != "triton" or decode_moe != "fused":
        raise ValueError(f"fused_decode needs kernels 'triton' and decode_moe 'fused' (got {kernels!r}, {decode_moe!r})")
    layer = causal_lm.model.layers[0]
    a = layer.self_attn
    if a.config.clip_qkv is not None or any(getattr(m, "bias", None) is not None
                                            for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.gate)):
        raise ValueError("fused_decode computes bias-free q/k/v, o and router projections without clip_qkv")


# -- modules -----------------------------------------------------------------------------------
@dataclass
class Step:
    """What every block needs for one pass: phase, rotary tables, and for decode the device position."""

    phase: str                                  # 'prefill' (positions 0..T-1) or 'decode' (one token)
    cos: torch.Tensor
    sin: torch.Tensor
    position: torch.Tensor                      # (1,) long on the device: the first new token's position
    zero: torch.Tensor                          # (1,) long zero on the device (where q rows start)
    bucket: int = 0                             # decode: cache positions attended (masked beyond position)
    mask: Optional[torch.Tensor] = None         # decode: (1, 1, 1, bucket) bool


class StaticKVCache:
    """Keys and values of every decoder block, ``[num_blocks, kv_heads, max_len, head_dim]``.

    ``epoch`` grows with every prefill; a decode state remembers the epoch it was made in, so a
    stale state (another prefill ran since) is refused instead of reading someone else's cache.
    """

    def __init__(self, *, num_blocks: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (num_blocks, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.epoch = 0

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


class FastAttention(nn.Module):
    """OLMoE self-attention of one block on the static cache (weights are the hf module's)."""

    def __init__(self, *, attn: nn.Module, index: int, cache: StaticKVCache, fused: bool) -> None:
        super().__init__()
        self.attn = attn
        self.index = index
        self.cache = cache
        self.head_dim = attn.head_dim
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads
        self.clip = attn.config.clip_qkv
        self.fused = fused and self.clip is None
        self.qkv_weight: Optional[torch.Tensor] = None     # fused path: [q; k; v] weights, made on first use

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        if self.fused:
            return self._forward_fused(x, step)
        a, t = self.attn, x.shape[0]
        q = rms_norm(a.q_proj(x), a.q_norm.weight, a.q_norm.variance_epsilon)
        k = rms_norm(a.k_proj(x), a.k_norm.weight, a.k_norm.variance_epsilon)
        v = a.v_proj(x)
        if self.clip is not None:
            q, k, v = (z.clamp(min=-self.clip, max=self.clip) for z in (q, k, v))
        q = apply_rotary(q.view(t, self.heads, self.head_dim).transpose(0, 1), step.cos, step.sin)
        k = apply_rotary(k.view(t, self.kv_heads, self.head_dim).transpose(0, 1), step.cos, step.sin)
        keys = self.cache.keys[self.index]
        if step.phase == "prefill":
            keys[:, :t].copy_(k)
        else:
            keys.index_copy_(1, step.position, k)
        return self._attend(q=q, v=v.view(t, self.kv_heads, self.head_dim).transpose(0, 1), step=step)

    def fused_qkv_weight(self) -> torch.Tensor:
        """[q; k; v] projection weights, concatenated on first use (the only copy the fast backend makes)."""
        if self.qkv_weight is None:
            a = self.attn
            self.qkv_weight = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().contiguous()
        return self.qkv_weight

    def _forward_fused(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """Same computation: one GEMM for q, k and v (their weights concatenated once, the only copy the
        fast backend makes), q/k norm + RoPE in one kernel each, ``k`` written into the cache by it."""
        return self.attend_qkv(F.linear(x, self.fused_qkv_weight()), step)

    def attend_qkv(self, qkv: torch.Tensor, step: Step, *, project: bool = True) -> torch.Tensor:
        """Attention from the fused q/k/v projection (T, (heads + 2 kv_heads) D): q/k norm + RoPE (k and v
        written into the cache), SDPA, then o_proj (``project``; else the heads' output (T, heads D))."""
        a, t = self.attn, qkv.shape[0]
        width_q, width_kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # q in (T, heads, D) memory, seen as (heads, T, D): SDPA's output takes q's layout, so the heads go
        # back to (T, H) for o_proj without a copy
        q = torch.empty(t, self.heads, self.head_dim, dtype=qkv.dtype, device=qkv.device).transpose(0, 1)
        fused_ops.qk_norm_rope(qkv[:, :width_q], weight=a.q_norm.weight, eps=a.q_norm.variance_epsilon, cos=step.cos,
                               sin=step.sin, heads=self.heads, out=q, position=step.zero)
        fused_ops.qk_norm_rope(qkv[:, width_q:width_q + width_kv], weight=a.k_norm.weight, eps=a.k_norm.variance_epsilon,
                               cos=step.cos, sin=step.sin, heads=self.kv_heads, out=self.cache.keys[self.index],
                               position=step.position, v=qkv[:, width_q + width_kv:],
                               v_out=self.cache.values[self.index])     # keys and values written to the cache
        return self._attend(q=q, v=None, step=step, project=project)

    def _attend(self, *, q: torch.Tensor, v: Optional[torch.Tensor], step: Step, project: bool = True) -> torch.Tensor:
        """Write ``v`` (kv_heads, T, D) into the cache (None: already there), attend ``q`` (heads, T, D)
        over the cached keys and values (the new keys are already there), and project the heads back: (T, H)."""
        t = q.shape[1]
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        gqa = {"enable_gqa": True} if self.heads != self.kv_heads else {}
        if step.phase == "prefill":
            if v is not None:
                values[:, :t].copy_(v)
            out = F.scaled_dot_product_attention(q[None], keys[None, :, :t], values[None, :, :t], is_causal=True,
                                                 **gqa)
        else:
            if v is not None:
                values.index_copy_(1, step.position, v)
            out = F.scaled_dot_product_attention(q[None], keys[None, :, :step.bucket], values[None, :, :step.bucket],
                                                 attn_mask=step.mask, **gqa)
        heads = out[0].transpose(0, 1).reshape(t, self.heads * self.head_dim)
        return self.attn.o_proj(heads) if project else heads


class FastMoe(nn.Module):
    """OLMoE's sparse MoE block (router + experts of the hf module) with knob-proportional cost."""

    def __init__(self, *, moe: nn.Module, decode_impl: str, prefill_impl: str, fused: bool) -> None:
        super().__init__()
        if decode_impl not in DECODE_MOE or prefill_impl not in PREFILL_MOE:
            raise ValueError(f"decode_moe {decode_impl!r} / prefill_moe {prefill_impl!r} not in {DECODE_MOE} / {PREFILL_MOE}")
        self.moe = moe
        self.decode_impl, self.prefill_impl = decode_impl, prefill_impl
        self.fused = fused

    @property
    def top_k(self) -> int:
        """The router's current ``top_k`` (the knob sets it on the hf router)."""
        return int(self.moe.gate.top_k)

    def forward(self, x: torch.Tensor, step: Step, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MoE output of (T, H) ``x``, plus ``residual`` if given (the prefill paths add it in their
        last kernel; the sum is rounded as ``residual + moe(x)`` in the model dtype)."""
        gate, experts = self.moe.gate, self.moe.experts
        weights, ids = route(x=x, weight=gate.weight, top_k=self.top_k, norm_topk_prob=gate.norm_topk_prob,
                             kernel=self.fused)
        args = dict(x=x, ids=ids, weights=weights, gate_up=experts.gate_up_proj, down=experts.down_proj)
        impl = self.decode_impl if step.phase == "decode" else self.prefill_impl
        if impl == "fused" and step.phase == "decode":     # one token: two GEMVs, the residual added by the second
            return fused_ops.moe_decode(**args, residual=residual)
        elif impl == "gather":        # decode only: one token
            out = experts_gather(**args, act=experts.act_fn)
        elif impl == "fused":
            return experts_fused(**args, residual=residual)
        elif impl == "loop":
            return experts_loop(**args, act=experts.act_fn, residual=residual)
        else:
            return experts_grouped(**args, act=experts.act_fn, mm=grouped_mm_function(), fused=self.fused,
                                   residual=residual)
        return out if residual is None else residual + out


class FastBlock(nn.Module):
    """One OLMoE decoder block: pre-norm attention and pre-norm MoE, each with a residual."""

    def __init__(self, *, layer: nn.Module, index: int, cache: StaticKVCache, decode_impl: str,
                 prefill_impl: str, fused: bool, fused_decode: bool = False) -> None:
        super().__init__()
        self.index = index
        self.fused = fused
        self.fused_decode = fused_decode
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.attention = FastAttention(attn=layer.self_attn, index=index, cache=cache, fused=fused)
        self.ffn = FastMoe(moe=layer.mlp, decode_impl=decode_impl, prefill_impl=prefill_impl, fused=fused)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        n1, n2 = self.input_norm, self.post_norm
        if self.fused_decode and step.phase == "decode":
            return self.decode_fused(x, step)
        if self.fused:   # the post-attention residual add rides in the second norm's kernel
            h = self.attention(fused_ops.rms_norm(x, n1.weight, n1.variance_epsilon)[0], step)
            normed, x = fused_ops.rms_norm(h, n2.weight, n2.variance_epsilon, residual=x)
            return self.ffn(normed, step, residual=x)     # the MoE's last kernel adds the residual
        x = x + self.attention(rms_norm(x, n1.weight, n1.variance_epsilon), step)
        return x + self.ffn(rms_norm(x, n2.weight, n2.variance_epsilon), step)


    def decode_fused(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """One decode token (1, H) through the block in fewer kernels (``fused_decode``): RMSNorm + q/k/v GEMV,
        q/k norm + RoPE (k and v into the cache), SDPA, o_proj GEMV + residual, RMSNorm + router + softmax +
        top-k, the chosen experts' gate/up GEMV + SiLU-mul, their down GEMV + weighted sum + residual."""
        n1, n2, attention, moe = self.input_norm, self.post_norm, self.attention, self.ffn.moe
        qkv = fused_ops.gemv(x, attention.fused_qkv_weight(), norm_weight=n1.weight, eps=n1.variance_epsilon)
        heads = attention.attend_qkv(qkv, step, project=False)
        h = fused_ops.gemv(heads, attention.attn.o_proj.weight, residual=x)
        normed, weights, ids = fused_ops.norm_route(h, norm_weight=n2.weight, eps=n2.variance_epsilon,
                                                    router=moe.gate.weight, top_k=self.ffn.top_k,
                                                    norm_topk_prob=moe.gate.norm_topk_prob)
        return fused_ops.moe_decode(x=normed, ids=ids, weights=weights, gate_up=moe.experts.gate_up_proj,
                                    down=moe.experts.down_proj, residual=h)


class FastDecoder:
    """Prefill and greedy decode steps of an ``OlmoeForCausalLM`` over a chosen set of blocks.

    ``prefill(hidden, blocks)`` takes the embedded prompt (1, T, H) and returns the last
    position's logits; ``decode(token, position, blocks)`` feeds one token at ``position`` and
    returns the argmax token (its logits stay in ``self.logits`` until the next step).
    """

    def __init__(self, *, causal_lm: nn.Module, max_len: int, decode_moe: str = "gather",
                 prefill_moe: str = "loop", cuda_graphs: bool = True, kv_bucket: int = KV_BUCKET,
                 kernels: str = "torch", max_graphs: int = MAX_GRAPHS, fused_decode: bool = False) -> None:
        model = causal_lm.model
        config = causal_lm.config
        self.embed = model.embed_tokens.weight
        self.norm = model.norm
        self.lm_head = causal_lm.lm_head.weight
        self.inv_freq = model.rotary_emb.inv_freq
        self.rope_scaling = float(model.rotary_emb.attention_scaling)
        self.device, self.dtype = self.embed.device, self.embed.dtype
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        check_kernels(kernels=kernels, decode_moe=decode_moe, prefill_moe=prefill_moe, device=self.device,
                      act=model.layers[0].mlp.experts.act_fn)
        self.kernels = kernels
        if fused_decode:
            check_fused_decode(causal_lm=causal_lm, kernels=kernels, decode_moe=decode_moe)
        self.fused_decode = bool(fused_decode)
        self.cache = StaticKVCache(num_blocks=config.num_hidden_layers, kv_heads=config.num_key_value_heads,
                                   max_len=max_len, head_dim=head_dim, device=self.device, dtype=self.dtype)
        self.blocks = [FastBlock(layer=layer, index=i, cache=self.cache, decode_impl=decode_moe,
                                 prefill_impl=prefill_moe, fused=kernels == "triton", fused_decode=self.fused_decode)
                       for i, layer in enumerate(model.layers)]
        self.kv_bucket = int(kv_bucket)
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.decode_moe, self.prefill_moe = decode_moe, prefill_moe
        dev = self.device
        self.token_in = torch.zeros(1, dtype=torch.long, device=dev)
        self.position_in = torch.zeros(1, dtype=torch.long, device=dev)
        self.zero = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = torch.zeros(config.vocab_size, dtype=self.dtype, device=dev)
        self.token_out = torch.zeros(1, dtype=torch.long, device=dev)
        self.host_tokens: Optional[torch.Tensor] = None       # decode_run's tokens, read back (pinned on CUDA)
        self.stop_event: Optional[Any] = None                 # decode_run: where a stop token left the device
        self.prefill_in: Optional[torch.Tensor] = None       # (max_len, H) graphed prefill input, made on first use
        self.prefill_last = torch.zeros(1, dtype=torch.long, device=dev)
        self.prefill_logits = torch.zeros(config.vocab_size, dtype=self.dtype, device=dev)
        self.arange = torch.arange(max_len, device=dev)
        if int(max_graphs) < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.graphs: OrderedDict[tuple, Any] = OrderedDict()   # least recently replayed first
        self.max_graphs = int(max_graphs)
        self.captures = 0                                      # graphs captured so far (evicted ones included)
        self.evictions = 0
        self.last_prefill_path = "eager"                      # how the last prefill ran: 'graphed' | 'eager'
        self.vision_io: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # graphed vision: (pixels, features)
        self._pool: Any = None

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, *, hidden: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
        """Run ``blocks`` over the embedded prompt (1, T, H) from position 0; logits (V,) of position T-1.

        With CUDA graphs on, a prefill MoE that never syncs with the host (not ``loop``) and no
        forward hooks on the blocks (hook timing needs Python between the blocks), the prompt is
        padded with zero rows to a multiple of ``PREFILL_BUCKET`` and the pass runs as one graph per
        (blocks, top_k per block, padded length); the padded rows come after every real one, so
        causal attention and the per-token MoE leave the real rows' results unchanged, and the cache
        rows they write lie beyond the prompt, where decode overwrites them before attending to them.
        """
        length = hidden.shape[1]
        if length > self.cache.max_len:
            raise ValueError(f"prompt of {length} tokens exceeds the static cache of {self.cache.max_len}")
        if self.use_graphs and self.prefill_moe != "loop" and not self._hooked(blocks):   # loop reads counts
            logits = self._prefill_graphed(hidden=hidden[0], blocks=tuple(blocks))
            self.last_prefill_path = "graphed"
        else:
            logits = self._prefill_rows(x=hidden[0], blocks=blocks, last=None)
            self.last_prefill_path = "eager"
        self.cache.epoch += 1
        return logits

    def _prefill_rows(self, *, x: torch.Tensor, blocks: Sequence[int], last: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits (V,) of row ``last`` (a device index; None: the last row) after ``blocks`` over rows ``x``."""
        positions = torch.arange(x.shape[0], device=self.device)
        cos, sin = rotary(positions=positions, inv_freq=self.inv_freq, scaling=self.rope_scaling, dtype=x.dtype)
        step = Step(phase="prefill", cos=cos, sin=sin, position=self.zero, zero=self.zero)
        for index in blocks:
            x = self.blocks[index](x, step)
        return self._head(x[-1:] if last is None else x.index_select(0, last))[0]

    def _hooked(self, blocks: Sequence[int]) -> bool:
        """Whether a forward hook is registered on a block or a block part that would run."""
        return any(m._forward_hooks or m._forward_pre_hooks
                   for i in blocks for m in (self.blocks[i], self.blocks[i].attention, self.blocks[i].ffn))

    def _prefill_graphed(self, *, hidden: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
        length = hidden.shape[0]
        padded = min(self.cache.max_len, math.ceil(length / PREFILL_BUCKET) * PREFILL_BUCKET)
        if self.prefill_in is None:
            self.prefill_in = torch.zeros(self.cache.max_len, hidden.shape[1], dtype=self.dtype, device=self.device)
        self.prefill_in[:length].copy_(hidden)
        self.prefill_in[length:padded].zero_()
        self.prefill_last.fill_(length - 1)
        key = ("prefill", blocks, tuple(self.blocks[i].ffn.top_k for i in blocks), padded)
        self._replay(key, lambda: self.prefill_logits.copy_(
            self._prefill_rows(x=self.prefill_in[:padded], blocks=blocks, last=self.prefill_last)))
        return self.prefill_logits.clone()      # callers keep prefill logits (verify-knobs compares them)

    # -- vision ----------------------------------------------------------------------------
    def vision(self, *, vision: nn.Module, pixel_values: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """``vision_features`` of the crops; with CUDA graphs, one graph per crop count (its output is
        copied out of the graph's static buffer, so callers may keep it)."""
        if not self.use_graphs:
            return vision_features(vision=vision, pixel_values=pixel_values, layers=layers)
        crops = pixel_values.shape[0]
        key = ("vision", crops, tuple(pixel_values.shape[1:]), tuple(layers))
        if key not in self.graphs:
            self.vision_io[key] = (torch.empty_like(pixel_values), torch.empty_like(
                vision_features(vision=vision, pixel_values=pixel_values, layers=layers)))
        pixels, out = self.vision_io[key]
        pixels.copy_(pixel_values)
        self._replay(key, lambda: out.copy_(vision_features(vision=vision, pixel_values=pixels, layers=layers)))
        return out.clone()

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.norm.weight, self.norm.variance_epsilon), self.lm_head)

    # -- decode ----------------------------------------------------------------------------
    def bucket(self, position: int) -> int:
        """Cache positions a step at ``position`` attends over: position + 1 rounded up to ``kv_bucket``."""
        return min(self.cache.max_len, math.ceil((position + 1) / self.kv_bucket) * self.kv_bucket)

    def graph_key(self, *, blocks: Sequence[int], position: int) -> tuple:
        """What fixes a decode step's shapes and control flow: blocks, top_k per block, kv bucket."""
        blocks = tuple(blocks)
        return blocks, tuple(self.blocks[i].ffn.top_k for i in blocks), self.bucket(position)

    def decode(self, *, token: int, position: int, blocks: Sequence[int]) -> int:
        """Feed ``token`` at ``position``; the greedy next token (logits in ``self.logits``)."""
        if not 0 <= position < self.cache.max_len:
            raise ValueError(f"decode position {position} is outside the static cache of {self.cache.max_len}")
        self.token_in.fill_(int(token))
        self.position_in.fill_(int(position))
        self._step(blocks=blocks, position=position)
        return int(self.token_out.item())

    def decode_run(self, *, token: int, position: int, blocks: Sequence[int], steps: int,
                   stop: Optional[int] = None) -> list[int]:
        """Up to ``steps`` greedy steps from ``token`` at ``position``, on CUDA the host one step ahead of the device.

        What ``decode`` does step by step, without the device waiting on the host between steps (the
        overlap of vLLM's async scheduling and SGLang's overlap scheduler): the next step's input token and
        position are copied on the device from this step's output, and on CUDA the step after is enqueued
        before this step's token is read back (a copy into pinned memory and an event per step); the host
        then waits for this step alone. The tokens are those of ``decode`` step by step. After the first
        ``stop`` token the run returns at once: ``self.stop_event`` is the event recorded when that token
        was copied out (where the request's output ended on the device), and the one step enqueued past it
        is left to finish on the stream (its cache write, one position past the output, is never read).
        On the CPU, where every op has finished when it returns, each token is read before the next step
        runs. ``self.logits`` holds the last step run's logits.
        """
        steps = int(steps)
        self.stop_event = None
        if steps <= 0:
            return []
        if position < 0 or position + steps > self.cache.max_len:
            raise ValueError(f"decode positions {position}..{position + steps - 1} are outside the static cache "
                             f"of {self.cache.max_len}")
        if self.host_tokens is None or self.host_tokens.numel() < self.cache.max_len:
            self.host_tokens = torch.zeros(self.cache.max_len, dtype=torch.long,
                                           pin_memory=self.device.type == "cuda")
        self.token_in.fill_(int(token))
        self.position_in.fill_(int(position))
        run_ahead = self.device.type == "cuda"
        tokens: list[int] = []
        pending = self._enqueue_step(slot=0, position=position, blocks=blocks)
        for slot in range(steps):
            more = slot + 1 < steps
            ahead = self._enqueue_step(slot=slot + 1, position=position + slot + 1, blocks=blocks) \
                if more and run_ahead else None
            if pending is not None:
                pending.synchronize()
            tokens.append(int(self.host_tokens[slot]))
            if stop is not None and tokens[-1] == stop:
                self.stop_event = pending if more else None
                break
            if more and not run_ahead:
                ahead = self._enqueue_step(slot=slot + 1, position=position + slot + 1, blocks=blocks)
            pending = ahead
        return tokens

    def _enqueue_step(self, *, slot: int, position: int, blocks: Sequence[int]) -> Optional[Any]:
        """One step from the device-side token and position; its token copied to ``host_tokens[slot]``, then
        the next step's input made on the device. A timing event recorded after the copy (None on the CPU)."""
        self._step(blocks=blocks, position=position)
        self.host_tokens[slot:slot + 1].copy_(self.token_out, non_blocking=True)
        self.token_in.copy_(self.token_out)
        self.position_in.add_(1)
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _step(self, *, blocks: Sequence[int], position: int) -> None:
        """One decode step from the input buffers: the graph of its key replayed (captured on first use), or
        the body run eagerly without graphs."""
        key = self.graph_key(blocks=blocks, position=position)
        if not self.use_graphs:
            self._decode_body(blocks=key[0], bucket=key[2])
        else:
            self._replay(key, lambda: self._decode_body(blocks=key[0], bucket=key[2]))

    def _decode_body(self, *, blocks: Sequence[int], bucket: int) -> None:
        """One step from the static input buffers to the static output buffers (what a graph records)."""
        x = F.embedding(self.token_in, self.embed)                                    # (1, H)
        cos, sin = rotary(positions=self.position_in, inv_freq=self.inv_freq, scaling=self.rope_scaling,
                          dtype=self.dtype)
        mask = (self.arange[:bucket] <= self.position_in).view(1, 1, 1, bucket)
        step = Step(phase="decode", cos=cos, sin=sin, position=self.position_in, zero=self.zero, bucket=bucket,
                    mask=mask)
        for index in blocks:
            x = self.blocks[index](x, step)
        logits = self._head(x)[0]
        self.logits.copy_(logits)
        self.token_out.copy_(torch.argmax(logits).view(1))

    def _replay(self, key: tuple, body: Callable[[], Any]) -> None:
        """Replay the graph of ``key``, capturing ``body`` into it first if there is none yet."""
        self.graph(key, lambda: self._capture(body)).replay()

    def graph(self, key: tuple, capture: Callable[[], Any]) -> Any:
        """The graph of ``key`` (most recently used now); ``capture()`` makes it when there is none, and
        the least recently used graphs beyond ``max_graphs`` are dropped (with a vision graph's buffers)."""
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return graph
        graph = self.graphs[key] = capture()
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            old, _ = self.graphs.popitem(last=False)
            self.vision_io.pop(old, None)
            self.evictions += 1
        return graph

    def _capture(self, body: Callable[[], Any]) -> Any:
        """Warm up on a side stream, then capture ``body`` (a decode step, a prefill or the ViT) into the pool.

        Warm-up runs execute ``body`` on the static buffers' current contents, writing the same keys,
        values and outputs the replay writes, so they leave the cache as the replay will. Every graph
        reads and writes only static buffers and the cache, and graphs replay one at a time on one
        stream, so sharing one memory pool between them is safe.
        """
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                body()
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            body()
        return graph

    def clear_graphs(self) -> None:
        """Drop every captured graph (their memory returns to the pool) and the vision graphs' buffers."""
        self.graphs.clear()
        self.vision_io.clear()
        self._pool = None   # the pool is freed with its last graph: a later capture takes a new one


# -- vision --------------------------------------------------------------------------------------
def vision_features(*, vision: nn.Module, pixel_values: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """CLIP hidden states ``layers`` (indices into ``hidden_states``) of every crop in one batch, CLS
    dropped, concatenated on the feature axis; layers past the deepest one asked for are not run."""
    encoder_layers = vision.encoder.layers
    count = len(encoder_layers) + 1
    wanted = [layer % count for layer in layers]
    h = vision.pre_layrnorm(vision.embeddings(pixel_values))
    states = {0: h}
    for i in range(max(wanted)):
        h = encoder_layers[i](h, None)
        h = h[0] if isinstance(h, tuple) else h
        states[i + 1] = h
    return torch.cat([states[w][:, 1:] for w in wanted], dim=-1)
