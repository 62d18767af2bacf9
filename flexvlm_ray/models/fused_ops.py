"""Triton kernels of the ``fast`` backend: one kernel where the eager path issues a chain of small ones.

Each kernel reproduces the rounding of the eager OLMoE code it replaces (statistics and
accumulation in float32, a cast to the model dtype wherever the eager code produces a tensor of
that dtype), so the fused and eager paths agree to the last bit or two of bf16:

* ``rms_norm`` (optionally with the residual add in front): OLMoE's RMSNorm, one row per program.
* ``qk_norm_rope``: the q/k RMSNorm over the full projection width, then rotary embedding, written
  straight into a ``(heads, T, head_dim)`` layout at an offset read from the device (for ``k`` the
  static KV cache itself, at the decode position).
* ``silu_mul``: ``silu(gate) * up`` of the experts' first GEMM.
* ``moe_decode``: one token through its ``k`` experts as two GEMV kernels that read only the chosen
  experts' rows straight from the stacked ``gate_up_proj`` / ``down_proj`` (no gather copy), the
  second one summing the router-weighted expert outputs.
* ``moe_combine``: the grouped prefill's weighted sum over each token's ``k`` expert outputs,
  reading them in sorted order through the inverse permutation (no scatter).

On CUDA the kernels are compiled by Triton; with ``TRITON_INTERPRET=1`` Triton runs them on the
CPU (numpy), which is how the CPU tests check them against the eager code.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:                       # CPU installs without Triton: the eager path runs
    triton = None
    tl = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: torch.device) -> bool:
    """Whether these kernels run for tensors on ``device``: CUDA with Triton, or the interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dt = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x + r).to(dt).to(tl.float32)
            tl.store(sum_ptr + row * n_cols + cols, x.to(dt), mask=mask)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        h = (x * rstd).to(dt).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (w * h).to(dt), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, pos_ptr, row_stride, head_stride, eps,
                             HEADS: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr, BHALF: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        dim = 2 * HALF
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, BHALF)[None, :]
        mask = (h < HEADS) & (d < HALF)
        dt = out_ptr.dtype.element_ty
        first = h * dim + d
        x1 = tl.load(x_ptr + t * row_stride + first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + t * row_stride + first + HALF, mask=mask, other=0.0).to(tl.float32)
        ss = tl.sum(tl.sum(x1 * x1, axis=1), axis=0) + tl.sum(tl.sum(x2 * x2, axis=1), axis=0)
        rstd = tl.rsqrt(ss / (HEADS * dim) + eps)
        w1 = tl.load(w_ptr + first, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + first + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = (w1 * (x1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        y2 = (w2 * (x2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        dmask = d < HALF
        c1 = tl.load(cos_ptr + t * dim + d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * dim + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * dim + d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * dim + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        o1 = (y1 * c1).to(dt).to(tl.float32) + (-y2 * s1).to(dt).to(tl.float32)
        o2 = (y2 * c2).to(dt).to(tl.float32) + (y1 * s2).to(dt).to(tl.float32)
        pos = tl.load(pos_ptr) + t
        dest = out_ptr + h * head_stride + pos * dim + d
        tl.store(dest, o1.to(dt), mask=mask)
        tl.store(dest + HALF, o2.to(dt), mask=mask)

    @triton.jit
    def _silu_mul_kernel(h_ptr, out_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        dt = out_ptr.dtype.element_ty
        g = tl.load(h_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(out_ptr + row * inter + cols, (a * u).to(dt), mask=mask)

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, ids_ptr, w_ptr, out_ptr, hidden: tl.constexpr, inter: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        slot = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < inter
        dt = out_ptr.dtype.element_ty
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        base = w_ptr + expert * 2 * inter * hidden
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < hidden
            xv = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            m = rmask[:, None] & cmask[None, :]
            wg = tl.load(base + rows[:, None] * hidden + cols[None, :], mask=m, other=0.0)
            wu = tl.load(base + (rows[:, None] + inter) * hidden + cols[None, :], mask=m, other=0.0)
            acc_g += wg.to(tl.float32) * xv
            acc_u += wu.to(tl.float32) * xv
        g = tl.sum(acc_g, axis=1).to(dt).to(tl.float32)
        u = tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(out_ptr + slot * inter + rows, (a * u).to(dt), mask=rmask)

    @triton.jit
    def _moe_down_kernel(a_ptr, ids_ptr, wts_ptr, w_ptr, out_ptr, hidden: tl.constexpr, inter: tl.constexpr,
                         top_k: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < hidden
        dt = out_ptr.dtype.element_ty
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for slot in tl.static_range(top_k):
            expert = tl.load(ids_ptr + slot).to(tl.int64)
            weight = tl.load(wts_ptr + slot).to(tl.float32)
            base = w_ptr + expert * hidden * inter
            acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                cmask = cols < inter
                av = tl.load(a_ptr + slot * inter + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                wd = tl.load(base + rows[:, None] * inter + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                             other=0.0)
                acc += wd.to(tl.float32) * av
            y = tl.sum(acc, axis=1).to(dt).to(tl.float32)
            total += (y * weight).to(dt).to(tl.float32)
        tl.store(out_ptr + rows, total.to(dt), mask=rmask)

    @triton.jit
    def _moe_combine_kernel(y_ptr, inv_ptr, wts_ptr, out_ptr, hidden, top_k: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        dt = out_ptr.dtype.element_ty
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for slot in tl.static_range(top_k):
            src = tl.load(inv_ptr + token * top_k + slot).to(tl.int64)
            weight = tl.load(wts_ptr + token * top_k + slot).to(tl.float32)
            y = tl.load(y_ptr + src * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            total += (y * weight).to(dt).to(tl.float32)
        tl.store(out_ptr + token * hidden + cols, total.to(dt), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of ``x + residual``, ``x + residual``) for (T, H) ``x``; without a residual, (norm, x)."""
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    res = residual.contiguous() if residual is not None else x
    block = _pow2(cols)
    _rms_norm_kernel[(rows,)](x, res, weight, out, summed, cols, float(eps), HAS_RES=residual is not None,
                              BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out, summed


def qk_norm_rope(x: torch.Tensor, *, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 heads: int, out: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """RMSNorm of (T, heads * D) ``x`` (rows may be strided, e.g. a column slice of a fused qkv output) over
    the full width, then RoPE with (T, D) ``cos``/``sin``, written into ``out`` (heads, L, D) at rows
    ``position[0] .. position[0] + T - 1``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens, width = x.shape
    dim = width // heads
    if out.stride(-1) != 1 or out.stride(-2) != dim:
        raise ValueError("qk_norm_rope writes rows of head_dim contiguous values")
    half = dim // 2
    _qk_norm_rope_kernel[(tokens,)](x, weight, cos.contiguous(), sin.contiguous(), out, position, x.stride(0),
                                    out.stride(0),
                                    float(eps), HEADS=heads, HALF=half, BH=_pow2(heads), BHALF=_pow2(half),
                                    num_warps=4)
    return out


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of (S, 2I) ``h`` (gate columns first): (S, I)."""
    h = h.contiguous()
    rows, inter = h.shape[0], h.shape[1] // 2
    out = torch.empty(rows, inter, dtype=h.dtype, device=h.device)
    if rows:
        block = min(1024, _pow2(inter))
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](h, out, inter, BLOCK=block, num_warps=4)
    return out


def moe_decode(*, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """One token (1, H) through its ``k`` experts (``ids``/``weights`` (1, k)); reads only those experts."""
    top_k = ids.shape[-1]
    hidden, inter = down.shape[1], down.shape[2]
    ids, weights = ids.reshape(top_k).contiguous(), weights.reshape(top_k).contiguous()
    act = torch.empty(top_k, inter, dtype=x.dtype, device=x.device)
    block_n = min(8, _pow2(inter))
    _moe_gate_up_kernel[(top_k, triton.cdiv(inter, block_n))](x.reshape(-1).contiguous(), ids, gate_up, act,
                                                              hidden, inter, BLOCK_N=block_n,
                                                              BLOCK_K=min(256, _pow2(hidden)), num_warps=4)
    out = torch.empty(1, hidden, dtype=x.dtype, device=x.device)
    block_m = min(8, _pow2(hidden))
    _moe_down_kernel[(triton.cdiv(hidden, block_m),)](act, ids, weights, down, out, hidden, inter, top_k,
                                                      BLOCK_M=block_m, BLOCK_K=min(256, _pow2(inter)), num_warps=4)
    return out


def moe_combine(*, y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over each token's ``k`` slots of ``weight * y`` where ``y`` (S, H) is in ``perm`` (sorted) order."""
    num_tokens, top_k = weights.shape
    hidden = y.shape[1]
    inverse = torch.empty_like(perm)
    inverse.scatter_(0, perm, torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype))
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    block = min(1024, _pow2(hidden))
    _moe_combine_kernel[(num_tokens, triton.cdiv(hidden, block))](y.contiguous(), inverse, weights.contiguous(),
                                                                  out, hidden, top_k, BLOCK=block, num_warps=4)
    return out
