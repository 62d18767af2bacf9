"""Triton kernels of the ``fast`` backend: one kernel where the eager path issues a chain of small ones.

Each kernel reproduces the rounding of the eager OLMoE code it replaces (statistics and
accumulation in float32, a cast to the model dtype wherever the eager code produces a tensor of
that dtype), so the fused and eager paths agree to the last bit or two of bf16:

* ``rms_norm`` (optionally with the residual add in front): OLMoE's RMSNorm, one row per program.
* ``qk_norm_rope``: the q/k RMSNorm over the full projection width, then rotary embedding, written
  straight into a ``(heads, T, head_dim)`` layout at an offset read from the device (for ``k`` the
  static KV cache itself, at the decode position).
* ``route``: the router's softmax (float32), top-k and weight cast after its GEMM, one launch.
* ``silu_mul``: ``silu(gate) * up`` of the experts' first GEMM.
* ``moe_decode``: one token through its ``k`` experts as two GEMV kernels that read only the chosen
  experts' rows straight from the stacked ``gate_up_proj`` / ``down_proj`` (no gather copy), the
  second one summing the router-weighted expert outputs.
* ``moe_sort``: the prefill's token-expert pairs in expert order (counting sort, stable), the inverse
  permutation and each expert's end offset, in one launch.
* ``moe_combine``: the grouped prefill's weighted sum over each token's ``k`` expert outputs,
  reading them in sorted order through the inverse permutation (no scatter), or in (token, slot) order,
  optionally with the block's residual add.
* ``moe_experts`` (prefill ``fused``, after vLLM's fused_moe): ``moe_align`` pads every expert's run of
  sorted pairs to whole ``BLOCK_M``-row tiles; one GEMM kernel gathers each tile's token rows straight
  from ``x`` and applies SiLU-mul in its epilogue, a second multiplies by the expert's down rows and
  writes each pair's output at its (token, slot) row; ``moe_combine`` sums the slots.

On CUDA the kernels are compiled by Triton; with ``TRITON_INTERPRET=1`` Triton runs them on the
CPU (numpy), which is how the CPU tests check them against the eager code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:                       # CPU installs without Triton: the eager path runs
    triton = None
    tl = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:                       # no Triton, or one without host-side TMA descriptors
    TensorDescriptor = None


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
    def _qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, pos_ptr, row_stride, head_stride, pos_stride, eps,
                             v_ptr, v_out_ptr, v_row_stride, v_head_stride, HAS_V: tl.constexpr,
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
        dest = out_ptr + h * head_stride + pos * pos_stride + d
        tl.store(dest, o1.to(dt), mask=mask)
        tl.store(dest + HALF, o2.to(dt), mask=mask)
        if HAS_V:       # the values of the same heads, copied as they are to the same rows
            v_src = v_ptr + t * v_row_stride + first
            v_dest = v_out_ptr + h * v_head_stride + pos * dim + d
            tl.store(v_dest, tl.load(v_src, mask=mask, other=0.0), mask=mask)
            tl.store(v_dest + HALF, tl.load(v_src + HALF, mask=mask, other=0.0), mask=mask)

    @triton.jit
    def _route_kernel(logits_ptr, wts_ptr, ids_ptr, num_tokens, num_experts, TOP_K: tl.constexpr,
                      NORM: tl.constexpr, BLOCK_T: tl.constexpr, BE: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BE)
        rmask = rows < num_tokens
        mask = rmask[:, None] & (cols[None, :] < num_experts)
        logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * num_experts + cols[None, :], mask=mask,
                         other=float("-inf")).to(tl.float32)
        top = tl.where(rmask, tl.max(logits, axis=1), 0.0)                 # rows past the end: no 0/0
        e = tl.where(mask, tl.exp(logits - top[:, None]), 0.0)
        total = tl.where(rmask, tl.sum(e, axis=1), 1.0)
        probs = tl.where(mask, e / total[:, None], -1.0)     # softmax in float32; padding below every prob
        denom = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
        if NORM:            # norm_topk_prob: the k largest renormalised to sum to one
            rest, denom = probs, tl.zeros([BLOCK_T], dtype=tl.float32)
            for _ in tl.static_range(TOP_K):
                best, _, rest = _pop_largest(rest, cols, BE)
                denom += best
        for slot in tl.static_range(TOP_K):
            best, first, probs = _pop_largest(probs, cols, BE)
            tl.store(wts_ptr + rows * TOP_K + slot, (best / denom).to(wts_ptr.dtype.element_ty), mask=rmask)
            tl.store(ids_ptr + rows * TOP_K + slot, first.to(tl.int64), mask=rmask)

    @triton.jit
    def _pop_largest(probs, cols, BE: tl.constexpr):
        """Each row's largest value (equal values: the lowest column first), its column, and the rows with
        that entry set below every probability."""
        best = tl.max(probs, axis=1)
        first = tl.min(tl.where(probs == best[:, None], cols[None, :], BE), axis=1)
        return best, first, tl.where(cols[None, :] == first[:, None], -1.0, probs)

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
    def _moe_down_kernel(a_ptr, ids_ptr, wts_ptr, w_ptr, out_ptr, res_ptr, hidden: tl.constexpr, inter: tl.constexpr,
                         top_k: tl.constexpr, RESIDUAL: tl.constexpr,
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
        if RESIDUAL:     # ``residual + moe(x)`` in the model dtype
            total = total.to(dt).to(tl.float32) + tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, total.to(dt), mask=rmask)

    @triton.jit
    def _gemv_kernel(x_ptr, nw_ptr, w_ptr, res_ptr, out_ptr, normed_ptr, n_rows, n_cols: tl.constexpr, eps,
                     NORM: tl.constexpr, RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out = W @ rms_norm(x) (NORM) or W @ x, plus ``res`` (RESIDUAL), for one row ``x`` of ``n_cols``;
        each program recomputes the norm's statistic (the row is a few KB) and owns BLOCK_N output rows."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n_rows
        dt = out_ptr.dtype.element_ty
        rstd = 1.0
        if NORM:
            ss = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, n_cols, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                xv = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                ss += xv * xv
            rstd = tl.rsqrt(tl.sum(ss, axis=0) / n_cols + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < n_cols
            xv = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            if NORM:     # OLMoE's RMSNorm rounding: (x * rstd) to the dtype, times the weight, to the dtype
                nw = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                xv = (nw * (xv * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                if WRITE_NORMED:     # by the first program
                    tl.store(normed_ptr + cols, xv.to(dt), mask=cmask & (tl.program_id(0) == 0))
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += w.to(tl.float32) * xv[None, :]
        y = tl.sum(acc, axis=1)
        if RESIDUAL:     # F.linear's output in the dtype, then ``residual + y`` in the dtype
            y = y.to(dt).to(tl.float32) + tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(dt), mask=rmask)

    @triton.jit
    def _norm_route_kernel(x_ptr, nw_ptr, w_ptr, normed_ptr, wts_ptr, ids_ptr, n_cols: tl.constexpr, num_experts, eps,
                           TOP_K: tl.constexpr, NORM_TOPK: tl.constexpr, BE: tl.constexpr, BLOCK_K: tl.constexpr):
        """One token: RMSNorm of ``x`` (written to ``normed``), the router's logits over every expert (rounded
        to the dtype as F.linear's output), softmax in float32, top-k; one program."""
        dt = normed_ptr.dtype.element_ty
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            ss += xv * xv
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / n_cols + eps)
        experts = tl.arange(0, BE)
        emask = experts < num_experts
        acc = tl.zeros([BE, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < n_cols
            xv = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            nw = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            h = (nw * (xv * rstd).to(dt).to(tl.float32)).to(dt)
            tl.store(normed_ptr + cols, h, mask=cmask)
            w = tl.load(w_ptr + experts[:, None].to(tl.int64) * n_cols + cols[None, :],
                        mask=emask[:, None] & cmask[None, :], other=0.0)
            acc += w.to(tl.float32) * h.to(tl.float32)[None, :]
        logits = tl.sum(acc, axis=1).to(dt).to(tl.float32)
        logits = tl.where(emask, logits, float("-inf"))[None, :]          # (1, BE)
        e = tl.where(emask[None, :], tl.exp(logits - tl.max(logits, axis=1)[:, None]), 0.0)
        probs = tl.where(emask[None, :], e / tl.sum(e, axis=1)[:, None], -1.0)
        denom = tl.full([1], 1.0, dtype=tl.float32)
        if NORM_TOPK:
            rest, denom = probs, tl.zeros([1], dtype=tl.float32)
            for _ in tl.static_range(TOP_K):
                best, _, rest = _pop_largest(rest, experts, BE)
                denom += best
        one = tl.arange(0, 1)
        for slot in tl.static_range(TOP_K):
            best, first, probs = _pop_largest(probs, experts, BE)
            tl.store(wts_ptr + slot + one, (best / denom).to(wts_ptr.dtype.element_ty))
            tl.store(ids_ptr + slot + one, first.to(tl.int64))

    @triton.jit
    def _moe_combine_kernel(y_ptr, inv_ptr, wts_ptr, res_ptr, out_ptr, hidden, top_k: tl.constexpr,
                            SORTED: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        dt = out_ptr.dtype.element_ty
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for slot in tl.static_range(top_k):
            if SORTED:
                src = tl.load(inv_ptr + token * top_k + slot).to(tl.int64)
            else:
                src = token * top_k + slot
            weight = tl.load(wts_ptr + token * top_k + slot).to(tl.float32)
            y = tl.load(y_ptr + src * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            total += (y * weight).to(dt).to(tl.float32)
        if RESIDUAL:     # the block's residual add, rounded like ``residual + moe(x)`` in the model dtype
            res = tl.load(res_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            total = total.to(dt).to(tl.float32) + res
        tl.store(out_ptr + token * hidden + cols, total.to(dt), mask=mask)

    @triton.jit(do_not_specialize=["num_pairs"])   # one compile for every prompt length
    def _moe_sort_kernel(ids_ptr, perm_ptr, inverse_ptr, tokens_ptr, offsets_ptr, num_pairs, num_experts, top_k,
                         BLOCK: tl.constexpr):
        expert = tl.program_id(0)
        lanes = tl.arange(0, BLOCK)
        before = tl.zeros([BLOCK], dtype=tl.int32)
        start = 0               # while loops: Triton's interpreter cannot range() over a runtime bound
        while start < num_pairs:                          # pass 1: pairs of lower experts come first
            ids = tl.load(ids_ptr + start + lanes, mask=start + lanes < num_pairs, other=num_experts)
            before += (ids < expert).to(tl.int32)
            start += BLOCK
        pos = tl.sum(before, 0)
        start = 0
        while start < num_pairs:                          # pass 2: this expert's pairs, in pair order
            pairs = start + lanes
            mine = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=num_experts) == expert
            rank = tl.cumsum(mine.to(tl.int32), 0)
            dest = pos + rank - 1
            tl.store(perm_ptr + dest, pairs.to(tl.int64), mask=mine)
            tl.store(inverse_ptr + pairs, dest.to(tl.int64), mask=mine)
            tl.store(tokens_ptr + dest, (pairs // top_k).to(tl.int64), mask=mine)
            pos += tl.sum(mine.to(tl.int32), 0)
            start += BLOCK
        tl.store(offsets_ptr + expert, pos)

    @triton.jit(do_not_specialize=["num_pairs"])   # one compile for every prompt length
    def _moe_align_kernel(offsets_ptr, perm_ptr, tile_expert_ptr, tile_pairs_ptr, num_pairs, num_experts,
                          BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
        tile = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        emask = e < num_experts
        end = tl.load(offsets_ptr + e, mask=emask, other=0)
        start = tl.load(offsets_ptr + e - 1, mask=emask & (e > 0), other=0)
        tiles = tl.where(emask, (end - start + BLOCK_M - 1) // BLOCK_M, 0)
        tiles_end = tl.cumsum(tiles, 0)
        expert = tl.sum((emask & (tiles_end <= tile)).to(tl.int32), 0)     # experts whose tiles all come before
        mine = e == expert
        first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
        pair_start = tl.sum(tl.where(mine, start, 0), 0)
        pair_end = tl.sum(tl.where(mine, end, 0), 0)
        pos = pair_start + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = (expert < num_experts) & (pos < pair_end)
        pairs = tl.load(perm_ptr + pos, mask=valid, other=0).to(tl.int32)
        tl.store(tile_pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M), tl.where(valid, pairs, num_pairs))
        tl.store(tile_expert_ptr + tile, tl.where(expert < num_experts, expert, -1))

    @triton.jit
    def _tile_grid(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(tile, column block) of program ``pid``, ``GROUP_M`` tiles sweeping the column blocks together."""
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m

    @triton.jit
    def _tile(tile_expert_ptr, num_tiles, width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP_M: tl.constexpr):
        """This program's (tile, column block, the tile's expert (-1: unused tile), its padded rows, its
        output columns) for a GEMM over ``width`` output columns."""
        pid_m, pid_n = _tile_grid(tl.program_id(0), num_tiles, tl.cdiv(width, BLOCK_N), GROUP_M)
        expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
        return (pid_m, pid_n, expert, pid_m * BLOCK_M + tl.arange(0, BLOCK_M),
                pid_n * BLOCK_N + tl.arange(0, BLOCK_N))

    @triton.jit(do_not_specialize=["num_pairs", "num_tiles"])   # one compile for every prompt length
    def _moe_gate_up_tiles_kernel(x_ptr, w_ptr, tile_expert_ptr, tile_pairs_ptr, out_ptr, num_pairs, num_tiles,
                                  hidden: tl.constexpr, inter: tl.constexpr, top_k: tl.constexpr,
                                  F32_DOT: tl.constexpr, W_DESC: tl.constexpr, PAIRED: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  GROUP_M: tl.constexpr):
        pid_m, pid_n, expert, rows, cols = _tile(tile_expert_ptr, num_tiles, inter, BLOCK_M, BLOCK_N, GROUP_M)
        if expert < 0:
            return
        pairs = tl.load(tile_pairs_ptr + rows)
        valid = pairs < num_pairs
        tokens = (pairs // top_k).to(tl.int64)
        nmask = cols < inter
        k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * hidden + k[None, :]
        if W_DESC:      # the tile's first gate row in (E * 2I, H)
            g_row = (expert * 2 * inter + pid_n * BLOCK_N).to(tl.int32)
        else:
            g_ptrs = w_ptr + expert * 2 * inter * hidden + cols[None, :].to(tl.int64) * hidden + k[:, None]
        if PAIRED:          # gate columns, then up columns
            acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        else:
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            kmask = k < hidden - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            if F32_DOT:
                a = a.to(tl.float32)
            if PAIRED:          # one (2, BN, BK) TMA tile of the (2E, I, H) view: gate and up rows, one dot
                w = tl.trans(tl.reshape(w_ptr.load([(expert * 2).to(tl.int32), (pid_n * BLOCK_N).to(tl.int32), k0]),
                                        [2 * BLOCK_N, BLOCK_K]))
                if F32_DOT:
                    acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w, acc)
            else:
                if W_DESC:          # TMA tile loads (the wrapper checks that tiles stay inside one expert)
                    wg = tl.trans(w_ptr.load([g_row, k0]))
                    wu = tl.trans(w_ptr.load([g_row + inter, k0]))
                else:
                    wg = tl.load(g_ptrs + k0, mask=kmask[:, None] & nmask[None, :], other=0.0)
                    wu = tl.load(g_ptrs + k0 + inter * hidden, mask=kmask[:, None] & nmask[None, :], other=0.0)
                if F32_DOT:
                    acc_g = tl.dot(a, wg.to(tl.float32), acc_g, input_precision="ieee")
                    acc_u = tl.dot(a, wu.to(tl.float32), acc_u, input_precision="ieee")
                else:
                    acc_g = tl.dot(a, wg, acc_g)
                    acc_u = tl.dot(a, wu, acc_u)
            a_ptrs += BLOCK_K
        if PAIRED:
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))
        dt = out_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)           # the eager path's GEMM output is in the model dtype
        u = acc_u.to(dt).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * inter + cols[None, :], (act * u).to(dt), mask=nmask[None, :])

    @triton.jit(do_not_specialize=["num_pairs", "num_tiles"])   # one compile for every prompt length
    def _moe_down_tiles_kernel(a_ptr, w_ptr, tile_expert_ptr, tile_pairs_ptr, out_ptr, num_pairs, num_tiles,
                               hidden: tl.constexpr, inter: tl.constexpr, F32_DOT: tl.constexpr,
                               W_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n, expert, rows, cols = _tile(tile_expert_ptr, num_tiles, hidden, BLOCK_M, BLOCK_N, GROUP_M)
        if expert < 0:
            return
        pairs = tl.load(tile_pairs_ptr + rows)
        valid = pairs < num_pairs
        nmask = cols < hidden
        k = tl.arange(0, BLOCK_K)
        if W_DESC:      # the tile's first row in (E * H, I)
            w_row = (expert * hidden + pid_n * BLOCK_N).to(tl.int32)
        else:
            a_ptrs = a_ptr + rows[:, None].to(tl.int64) * inter + k[None, :]
            w_ptrs = w_ptr + expert * hidden * inter + cols[None, :].to(tl.int64) * inter + k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            kmask = k < inter - k0
            if W_DESC:      # the activation rows of a tile are contiguous: TMA loads them too
                a = a_ptr.load([(pid_m * BLOCK_M).to(tl.int32), k0])
                w = tl.trans(w_ptr.load([w_row, k0]))
            else:
                a = tl.load(a_ptrs + k0, mask=kmask[None, :], other=0.0)
                w = tl.load(w_ptrs + k0, mask=kmask[:, None] & nmask[None, :], other=0.0)
            if F32_DOT:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        dest = out_ptr + pairs[:, None].to(tl.int64) * hidden + cols[None, :]
        tl.store(dest, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


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
                 heads: int, out: torch.Tensor, position: torch.Tensor, v: Optional[torch.Tensor] = None,
                 v_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm of (T, heads * D) ``x`` (rows may be strided, e.g. a column slice of a fused qkv output) over
    the full width, then RoPE with (T, D) ``cos``/``sin``, written into ``out`` (heads, L, D) at rows
    ``position[0] .. position[0] + T - 1`` (``out`` may be a (T, heads, D) buffer seen as (heads, T, D)).
    With ``v`` (T, heads * D) and ``v_out`` (heads, L, D) (the values and their cache, rows of D contiguous
    values), ``v`` is copied unchanged to the same rows of ``v_out`` in the same launch."""
    x = _unit_stride(x)
    tokens, width = x.shape
    dim = width // heads
    if out.stride(-1) != 1 or (v_out is not None and (v_out.stride(-1) != 1 or v_out.stride(-2) != dim)):
        raise ValueError("qk_norm_rope writes head_dim contiguous values (and v_out rows of head_dim values)")
    if (v is None) != (v_out is None):
        raise ValueError("qk_norm_rope copies values only with both v and v_out")
    if v is not None:
        v = _unit_stride(v)
        if v.shape != x.shape or v_out.shape[0] != heads:
            raise ValueError(f"qk_norm_rope: v {tuple(v.shape)} / v_out {tuple(v_out.shape)} do not match "
                             f"x {tuple(x.shape)} with {heads} heads")
    half = dim // 2
    v_args = (v, v_out, v.stride(0), v_out.stride(0)) if v is not None else (x, out, 0, 0)
    _qk_norm_rope_kernel[(tokens,)](x, weight, cos.contiguous(), sin.contiguous(), out, position, x.stride(0),
                                    out.stride(0), out.stride(1), float(eps), *v_args, HAS_V=v is not None,
                                    HEADS=heads, HALF=half, BH=_pow2(heads), BHALF=_pow2(half), num_warps=4)
    return out


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its rows are unit-stride (row stride free), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def route(logits: torch.Tensor, *, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMoE's routing after the router GEMM, in one launch: softmax of (T, E) ``logits`` in float32, the
    ``top_k`` largest (largest first; equal values: lowest expert first), renormalised if
    ``norm_topk_prob``. Returns (weights (T, k) in the logits' dtype, expert ids (T, k) int64)."""
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"route: top_k {top_k} not in 1..{num_experts}")
    weights = torch.empty(num_tokens, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    block_t = 16
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](logits, weights, ids, num_tokens, num_experts, TOP_K=top_k,
                                                       NORM=norm_topk_prob, BLOCK_T=block_t,
                                                       BE=max(2, _pow2(num_experts)), num_warps=4)
    return weights, ids


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
               down: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token (1, H) through its ``k`` experts (``ids``/``weights`` (1, k)); reads only those experts.
    ``residual`` (1, H), if given, is added in the second kernel (``residual + out`` in the dtype)."""
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
    res = out if residual is None else residual.reshape(-1).contiguous()
    _moe_down_kernel[(triton.cdiv(hidden, block_m),)](act, ids, weights, down, out, res, hidden, inter, top_k,
                                                      RESIDUAL=residual is not None,
                                                      BLOCK_M=block_m, BLOCK_K=min(256, _pow2(inter)), num_warps=4)
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
         residual: Optional[torch.Tensor] = None, normed_out: Optional[torch.Tensor] = None,
         block_n: int = 8) -> torch.Tensor:
    """One token's ``F.linear(x, weight)`` (x (1, K), weight (N, K)) in one launch, with OLMoE's RMSNorm of
    ``x`` in front when ``norm_weight`` is given (so ``F.linear(rms_norm(x), weight)``; with ``normed_out``
    (1, K) the normed row is written there too) and ``residual`` (1, N) added after (``residual + y`` in the
    dtype). Returns (1, N)."""
    x = x.reshape(-1).contiguous()
    n_rows, n_cols = weight.shape
    if x.numel() != n_cols or weight.stride(-1) != 1 or weight.stride(0) != n_cols:
        raise ValueError(f"gemv: x of {x.numel()} values against a contiguous weight {tuple(weight.shape)}")
    out = torch.empty(1, n_rows, dtype=x.dtype, device=x.device)
    unused = x
    res = residual.reshape(-1).contiguous() if residual is not None else unused
    block_n = min(block_n, _pow2(n_rows))
    _gemv_kernel[(triton.cdiv(n_rows, block_n),)](
        x, unused if norm_weight is None else norm_weight, weight, res, out,
        unused if normed_out is None else normed_out, n_rows, n_cols, float(eps), NORM=norm_weight is not None,
        RESIDUAL=residual is not None, WRITE_NORMED=normed_out is not None, BLOCK_N=block_n,
        BLOCK_K=min(512, _pow2(n_cols)), num_warps=4)
    return out


def norm_route(x: torch.Tensor, *, norm_weight: torch.Tensor, eps: float, router: torch.Tensor, top_k: int,
               norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token's post-attention RMSNorm and routing in one launch: (normed (1, H), weights (1, k) in the
    dtype, expert ids (1, k) int64), as ``rms_norm`` then ``F.linear(normed, router)`` then ``route``."""
    x = x.reshape(-1).contiguous()
    num_experts, n_cols = router.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"norm_route: top_k {top_k} not in 1..{num_experts}")
    normed = torch.empty(1, n_cols, dtype=x.dtype, device=x.device)
    weights = torch.empty(1, top_k, dtype=x.dtype, device=x.device)
    ids = torch.empty(1, top_k, dtype=torch.int64, device=x.device)
    be = max(2, _pow2(num_experts))
    _norm_route_kernel[(1,)](x, norm_weight, router.contiguous(), normed, weights, ids, n_cols, num_experts,
                             float(eps), TOP_K=top_k, NORM_TOPK=norm_topk_prob, BE=be,
                             BLOCK_K=max(16, min(256, 8192 // be)), num_warps=8)
    return normed, weights, ids


def moe_combine(*, y: torch.Tensor, inverse: Optional[torch.Tensor], weights: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over each token's ``k`` slots of ``weight * y`` (each product rounded to y's dtype, the sum in
    float32) where row ``inverse[p]`` of ``y`` (S, H) is pair ``p``'s output (``y`` in sorted order), or
    ``y`` is in (token, slot) order if ``inverse`` is None; plus ``residual`` (T, H) if given."""
    num_tokens, top_k = weights.shape
    hidden = y.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    block = min(1024, _pow2(hidden))
    unused = weights         # a placeholder pointer for the arguments a flag leaves unread
    _moe_combine_kernel[(num_tokens, triton.cdiv(hidden, block))](
        y.contiguous(), unused if inverse is None else inverse, weights.contiguous(),
        unused if residual is None else residual.contiguous(), out, hidden, top_k, SORTED=inverse is not None,
        RESIDUAL=residual is not None, BLOCK=block, num_warps=4)
    return out


def moe_sort(ids: torch.Tensor, *, num_experts: int, block: Optional[int] = None,
             num_warps: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token-expert pairs of (T, k) router ``ids`` (pair ``p`` = token ``p // k``, slot ``p % k``) in
    expert order by a counting sort, stable: one program per expert counts the pairs of lower experts,
    then writes its own pairs in pair order. Returns (``perm`` (S,): the pair at each sorted position,
    ``inverse`` (S,): the sorted position of each pair, ``tokens`` (S,): the token at each sorted
    position, all int64; ``offsets`` (E,) int32: where each expert's run ends), as a stable ``torch.sort``
    with a binary search per expert would, in one launch."""
    if ids.dim() != 2:
        raise ValueError(f"moe_sort takes (tokens, top_k) expert ids, not shape {tuple(ids.shape)}")
    top_k = ids.shape[1]
    ids = ids.contiguous()
    num_pairs = ids.numel()
    perm, inverse, tokens = (torch.empty(num_pairs, dtype=torch.int64, device=ids.device) for _ in range(3))
    offsets = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    # pairs per step: on an H100 (moe_kernel_bench) 4096 was fastest from ~11k pairs, 2048 below
    block = block or (4096 if num_pairs > 8192 else min(2048, max(16, _pow2(num_pairs))))
    _moe_sort_kernel[(num_experts,)](ids, perm, inverse, tokens, offsets, num_pairs, num_experts, top_k, BLOCK=block,
                                     num_warps=num_warps or (8 if block >= 1024 else 4))
    return perm, inverse, tokens, offsets


@dataclass(frozen=True)
class MoeConfig:
    """Tiles and launch settings of the fused prefill MoE's gate/up GEMM kernel, and of its down GEMM
    kernel unless ``down`` gives that one its own; ``block_m`` is shared (it also pads the experts' row
    runs in ``moe_align``, whose tiles both kernels walk)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    down: Optional["MoeConfig"] = None
    paired: bool = False     # gate/up GEMM with TMA: one (2, BN, BK) tile of gate and up rows, one dot of 2*BN columns

    def __post_init__(self) -> None:
        if min(self.block_m, self.block_n, self.block_k) < 16 or min(self.group_m, self.num_warps,
                                                                      self.num_stages) < 1:
            raise ValueError(f"MoE config {self}: want BM,BN,BK,GM,warps,stages with BM, BN, BK >= 16 "
                             "and the others >= 1")
        if self.down is not None and (self.down.block_m != self.block_m or self.down.down is not None
                                      or self.down.paired):
            raise ValueError(f"MoE config {self}: the down GEMM shares BM={self.block_m} and has no config "
                             "of its own and no pairing")

    @property
    def down_gemm(self) -> "MoeConfig":
        """The down GEMM kernel's settings."""
        return self.down or self

    def __str__(self) -> str:
        head = f"{self.block_m},{self.block_n},{self.block_k},{self.group_m},{self.num_warps},{self.num_stages}"
        head += ",paired" if self.paired else ""
        if self.down is None:
            return head
        d = self.down
        return f"{head}/{d.block_n},{d.block_k},{d.group_m},{d.num_warps},{d.num_stages}"

    @classmethod
    def parse(cls, text: str) -> "MoeConfig":
        """``"BM,BN,BK,GM,warps,stages"`` for both GEMM kernels (``",paired"`` after it: the gate/up GEMM
        loads gate and up tiles as one), or with ``"/BN,BK,GM,warps,stages"`` after it for the down kernel
        (the format of ``FLEXVLM_MOE_CONFIG``)."""
        head, _, tail = text.partition("/")
        paired = head.endswith(",paired")
        head = head.removesuffix(",paired")
        try:
            values = [int(v) for v in head.split(",")]
            down = [int(v) for v in tail.split(",")] if tail else None
        except ValueError:
            values = down = []
        if len(values) != 6 or (down is not None and len(down) != 5):
            raise ValueError(f"MoE config {text!r}: want BM,BN,BK,GM,warps,stages (then optionally "
                             "/BN,BK,GM,warps,stages for the down GEMM) with BM, BN, BK >= 16")
        return cls(*values, down=cls(values[0], *down) if down else None, paired=paired)


# (largest mean pairs per expert, config). On an H100 (moe_kernel_bench --kernel-sweep, 2026-11-23, session g
# runs 1 and 4: each GEMM kernel timed alone over its grid, then the layer with the fastest pair): 128-row
# tiles; the gate/up GEMM with its gate and up tiles in one TMA load and one dot ("paired": 3 to 6% faster
# than two dots), 64 columns per half up to 128 pairs per expert and 128 above; the down GEMM 128 columns
# wide, then 256. Per molmoe-1b layer 0.335 / 0.425 / 0.495 / 0.709 ms at 768 / 1280 / 1920 / 3072 padded
# tokens (run 4), against 0.344 / 0.438 / 0.524 / 0.744 for the unpaired configs of run 1 on the same
# machine, and 0.349 / 0.455 / 0.521 / 0.772 (run 1) for the earlier single 128,128,64,8,8,3 config.
# Small M keeps 16-row tiles. Without TMA (before Hopper) "paired" falls back to two pointer-loaded tiles.
MOE_CONFIGS: tuple[tuple[float, MoeConfig], ...] = (
    (16, MoeConfig(16, 64, 64, 1, 4, 3)),
    (128, MoeConfig.parse("128,64,64,4,8,3,paired/128,64,8,8,5")),
    (256, MoeConfig.parse("128,128,64,8,8,4,paired/256,64,8,8,4")),
    (float("inf"), MoeConfig.parse("128,128,64,1,8,4,paired/256,64,1,8,4")),
)
MOE_CONFIG_ENV = "FLEXVLM_MOE_CONFIG"


def moe_config(*, num_pairs: int, num_experts: int) -> MoeConfig:
    """``FLEXVLM_MOE_CONFIG`` if set, else the first ``MOE_CONFIGS`` row covering the mean pairs per expert."""
    text = os.environ.get(MOE_CONFIG_ENV)
    if text:
        return MoeConfig.parse(text)
    mean = num_pairs / num_experts
    return next(config for limit, config in MOE_CONFIGS if mean <= limit)


def moe_align(*, perm: torch.Tensor, offsets: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad every expert's run of sorted pairs to whole tiles of ``block_m`` rows, on the device.

    ``perm`` (S,): pair indices in expert order; ``offsets`` (E,) int32: where each expert's run ends.
    Returns ``tile_expert`` (cdiv(S, block_m) + E,) int32, the expert of each tile in expert order
    (-1 for the tiles beyond the last used one), and ``tile_pairs`` (tiles * block_m,) int32, the pair
    index of each padded row (S for padding). Sized for the worst case, so no count leaves the device.
    """
    num_pairs, num_experts = perm.numel(), offsets.numel()
    tiles = triton.cdiv(num_pairs, block_m) + num_experts
    tile_expert = torch.empty(tiles, dtype=torch.int32, device=perm.device)
    tile_pairs = torch.empty(tiles * block_m, dtype=torch.int32, device=perm.device)
    _moe_align_kernel[(tiles,)](offsets, perm, tile_expert, tile_pairs, num_pairs, num_experts,
                                BLOCK_E=max(2, _pow2(num_experts)), BLOCK_M=block_m, num_warps=4)
    return tile_expert, tile_pairs


def weight_descriptors(*, gate_up: torch.Tensor, down: torch.Tensor, config: MoeConfig,
                       enabled: Optional[bool] = None) -> Optional[tuple[Any, Any]]:
    """TMA descriptors of the stacked expert weights as 2-D (E * 2I, H) and (E * H, I) matrices, with
    (BLOCK_N, BLOCK_K) tiles of each GEMM's config, for the fused MoE GEMMs to load weight tiles with the
    Hopper tensor-memory accelerator; None where they do not apply: ``enabled`` False, no
    ``TensorDescriptor`` in this Triton, a GPU older than Hopper (the interpreter takes them), or a tile
    that would cross from one expert's (or gate/up half's) rows into the next (``I`` must be a multiple
    of the gate/up GEMM's BLOCK_N, ``H`` of the down GEMM's). ``enabled`` None: on where they apply."""
    if enabled is False or TensorDescriptor is None:
        return None
    hopper = gate_up.device.type == "cuda" and torch.cuda.get_device_capability(gate_up.device)[0] >= 9
    if not (hopper or interpreting()):
        if enabled:
            raise ValueError("TMA weight descriptors need a Hopper (sm90+) GPU or Triton's interpreter")
        return None
    num_experts, hidden, inter = down.shape
    up_cfg, down_cfg = config, config.down_gemm
    fits = inter % up_cfg.block_n == 0 and hidden % down_cfg.block_n == 0 and gate_up.is_contiguous() \
        and down.is_contiguous()
    if not fits:
        if enabled:
            raise ValueError(f"TMA weight tiles of {up_cfg.block_n} (gate/up) and {down_cfg.block_n} (down) rows "
                             f"do not divide I={inter} and H={hidden}")
        return None
    if up_cfg.paired:     # (2E, I, H): rows 2e and 2e + 1 are expert e's gate and up halves
        w_gate_up = TensorDescriptor.from_tensor(gate_up.view(num_experts * 2, inter, hidden),
                                                 block_shape=[2, up_cfg.block_n, up_cfg.block_k])
    else:
        w_gate_up = TensorDescriptor.from_tensor(gate_up.view(num_experts * 2 * inter, hidden),
                                                 block_shape=[up_cfg.block_n, up_cfg.block_k])
    return (w_gate_up,
            TensorDescriptor.from_tensor(down.view(num_experts * hidden, inter),
                                         block_shape=[down_cfg.block_n, down_cfg.block_k]))


def _launch(config: MoeConfig, *, f32: bool) -> dict[str, Any]:
    """One fused GEMM kernel's tile constants and launch settings."""
    # float32 operands (and the interpreter, whose tl.dot misreads bfloat16): exact float32 products, no TF32
    return dict(F32_DOT=f32 or interpreting(), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps,
                num_stages=config.num_stages)


def moe_gate_up(*, x: torch.Tensor, tile_expert: torch.Tensor, tile_pairs: torch.Tensor, num_pairs: int,
                top_k: int, gate_up: Any, inter: int, config: MoeConfig) -> torch.Tensor:
    """The fused MoE's first GEMM: each ``moe_align`` tile's token rows of (T, H) ``x`` gathered and
    multiplied by its expert's gate and up rows (``gate_up``: the (E, 2I, H) tensor, or its TMA
    descriptor), SiLU-mul in the epilogue. Returns (tiles * BLOCK_M, I), a row per padded tile row."""
    tiles, hidden = tile_expert.numel(), x.shape[1]
    act = torch.empty(tiles * config.block_m, inter, dtype=x.dtype, device=x.device)
    grid = (tiles * triton.cdiv(inter, config.block_n),)
    tma = not torch.is_tensor(gate_up)
    _moe_gate_up_tiles_kernel[grid](x, gate_up, tile_expert, tile_pairs, act, num_pairs, tiles, hidden, inter,
                                    top_k, W_DESC=tma, PAIRED=tma and len(gate_up.block_shape) == 3,
                                    **_launch(config, f32=x.dtype == torch.float32))
    return act


def moe_down(*, act: torch.Tensor, tile_expert: torch.Tensor, tile_pairs: torch.Tensor, num_pairs: int,
             down: Any, hidden: int, config: MoeConfig) -> torch.Tensor:
    """The fused MoE's second GEMM: ``moe_gate_up``'s rows by their expert's down rows (``down``: the
    (E, H, I) tensor, or its TMA descriptor, then the activation rows load through TMA too), each pair's
    output written at its (token, slot) row. Returns (num_pairs, H)."""
    tiles, inter = tile_expert.numel(), act.shape[1]
    y = torch.empty(num_pairs, hidden, dtype=act.dtype, device=act.device)
    grid = (tiles * triton.cdiv(hidden, config.block_n),)
    tma = not torch.is_tensor(down)
    a = TensorDescriptor.from_tensor(act, block_shape=[config.block_m, config.block_k]) if tma else act
    _moe_down_tiles_kernel[grid](a, down, tile_expert, tile_pairs, y, num_pairs, tiles, hidden, inter,
                                 W_DESC=tma, **_launch(config, f32=act.dtype == torch.float32))
    return y


def moe_experts(*, x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, config: Optional[MoeConfig] = None,
                residual: Optional[torch.Tensor] = None, tma: Optional[bool] = None) -> torch.Tensor:
    """(T, H) ``x`` through its experts: pairs ``perm`` (sorted by expert, runs ending at ``offsets``),
    router ``weights`` (T, k), ``gate_up`` (E, 2I, H) with gate rows first, ``down`` (E, H, I); ``residual``
    (T, H), if given, is added to the output as ``moe_combine`` adds it.

    Rounds like the grouped path with Triton kernels: each GEMM's float32 accumulator is rounded to x's
    dtype, then SiLU-mul and the weighted sum as ``silu_mul`` and ``moe_combine`` do; the GEMMs sum in
    another order, so results agree to float32 summation error before each rounding.
    """
    num_tokens, top_k = weights.shape
    num_experts, hidden, inter = down.shape
    num_pairs = perm.numel()
    config = config or moe_config(num_pairs=num_pairs, num_experts=num_experts)
    tile_expert, tile_pairs = moe_align(perm=perm, offsets=offsets, block_m=config.block_m)
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    w_gate_up, w_down = weight_descriptors(gate_up=gate_up, down=down, config=config, enabled=tma) or (gate_up, down)
    tiles = dict(tile_expert=tile_expert, tile_pairs=tile_pairs, num_pairs=num_pairs)
    act = moe_gate_up(x=x, **tiles, top_k=top_k, gate_up=w_gate_up, inter=inter, config=config)
    y = moe_down(act=act, **tiles, down=w_down, hidden=hidden, config=config.down_gemm)
    return moe_combine(y=y, inverse=None, weights=weights, residual=residual)
