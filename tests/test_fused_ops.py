"""The fast backend's Triton kernels, run by Triton's CPU interpreter (conftest sets TRITON_INTERPRET):
each kernel against the eager code it replaces, in float32 and bfloat16, and the whole ``kernels:
triton`` + ``decode_moe: fused`` decoder against the hf backend."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from flexvlm_ray.models import Knobs
from flexvlm_ray.models.flexmoe.fast import ops as fused_ops
from flexvlm_ray.spec.load import SpecError, check_semantics, load_spec_text
from flexvlm_ray.models.flexmoe.fast.decoder import (_combine, apply_rotary, check_kernels, experts_fused, experts_gather,
                                             experts_grouped, experts_loop, grouped_mm_function, rms_norm, rotary,
                                             sort_pairs)
from model_support import generate, make_flexmoe, rel_err, sample

DTYPES = [torch.float32, torch.bfloat16]


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """float32: the same math up to float32 summation order, element by element. bfloat16: a few rounding
    steps apart, as a norm (Triton's interpreter casts float32 to bfloat16 by truncation where the GPU and
    PyTorch round to nearest even; tests/test_fast_backend_gpu.py compares on the GPU)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        assert float((out.double() - ref.double()).norm() / ref.double().norm()) < 4e-2   # truncation: biased low


def test_kernels_run_in_the_interpreter_here():
    assert fused_ops.runs_on(torch.device("cpu"))      # Triton from requirements-cpu.txt, TRITON_INTERPRET from conftest


def randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, cols", [(1, 64), (5, 48)])
def test_rms_norm_with_and_without_residual(dtype, rows, cols):
    x, res, w = randn(rows, cols, dtype=dtype), randn(rows, cols, dtype=dtype, seed=1), randn(cols, dtype=dtype, seed=2)
    out, same = fused_ops.rms_norm(x, w, 1e-5)
    assert same is x
    assert_close(out, rms_norm(x, w, 1e-5))
    out, summed = fused_ops.rms_norm(x, w, 1e-5, residual=res)
    assert_close(summed, x + res)   # the interpreter truncates bf16 casts (GPU: RNE)
    assert_close(out, rms_norm(x + res, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, heads, dim, start, strided", [(3, 4, 16, 0, False), (1, 2, 8, 5, True),
                                                                 (4, 3, 32, 2, True)])
def test_qk_norm_rope_writes_rows_at_the_device_position(dtype, tokens, heads, dim, start, strided):
    x, w = randn(tokens, heads * dim, dtype=dtype), randn(heads * dim, dtype=dtype, seed=1)
    if strided:     # a column slice of a fused q|k|v output: rows 3 * width apart
        x = torch.cat([randn(tokens, heads * dim, dtype=dtype, seed=9), x, x], dim=1)[:, heads * dim:2 * heads * dim]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    cos, sin = rotary(positions=torch.arange(start, start + tokens), inv_freq=inv_freq, scaling=1.0, dtype=dtype)
    cache = torch.full((heads, 16, dim), 7.0, dtype=dtype)
    fused_ops.qk_norm_rope(x, weight=w, eps=1e-6, cos=cos, sin=sin, heads=heads, out=cache,
                           position=torch.tensor([start]))
    ref = apply_rotary(rms_norm(x, w, 1e-6).view(tokens, heads, dim).transpose(0, 1), cos, sin)
    assert_close(cache[:, start:start + tokens], ref)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[start:start + tokens] = False
    assert bool((cache[:, untouched] == 7.0).all())


def test_qk_norm_rope_writes_a_token_major_buffer():
    """q goes to a (T, heads, D) buffer seen as (heads, T, D), so attention's output needs no copy."""
    tokens, heads, dim = 5, 3, 8
    x, w = randn(tokens, heads * dim, dtype=torch.float32), randn(heads * dim, dtype=torch.float32, seed=1)
    cos, sin = rotary(positions=torch.arange(tokens), inv_freq=torch.rand(dim // 2), scaling=1.0, dtype=torch.float32)
    head_major = torch.empty(heads, tokens, dim)
    token_major = torch.empty(tokens, heads, dim).transpose(0, 1)
    for out in (head_major, token_major):
        fused_ops.qk_norm_rope(x, weight=w, eps=1e-6, cos=cos, sin=sin, heads=heads, out=out, position=torch.tensor([0]))
    assert torch.equal(head_major, token_major)
    assert token_major.transpose(0, 1).is_contiguous()


@pytest.mark.parametrize("strided", [False, True])
def test_qk_norm_rope_copies_the_values_to_the_same_cache_rows(strided):
    tokens, heads, dim, start = 3, 2, 8, 4
    qkv = randn(tokens, 3 * heads * dim, dtype=torch.bfloat16)
    k, v = qkv[:, heads * dim:2 * heads * dim], qkv[:, 2 * heads * dim:]
    if not strided:
        k, v = k.contiguous(), v.contiguous()
    cos, sin = rotary(positions=torch.arange(start, start + tokens), inv_freq=torch.ones(dim // 2), scaling=1.0,
                      dtype=torch.bfloat16)
    keys, values = (torch.full((heads, 16, dim), 7.0, dtype=torch.bfloat16) for _ in range(2))
    w = randn(heads * dim, dtype=torch.bfloat16, seed=1)
    fused_ops.qk_norm_rope(k, weight=w, eps=1e-6, cos=cos, sin=sin, heads=heads, out=keys,
                           position=torch.tensor([start]), v=v, v_out=values)
    assert torch.equal(values[:, start:start + tokens], v.reshape(tokens, heads, dim).transpose(0, 1))
    assert bool((values[:, :start] == 7.0).all()) and bool((values[:, start + tokens:] == 7.0).all())
    assert_close(keys[:, start:start + tokens],
                 apply_rotary(rms_norm(k, w, 1e-6).view(tokens, heads, dim).transpose(0, 1), cos, sin))
    with pytest.raises(ValueError, match="both v and v_out"):
        fused_ops.qk_norm_rope(k, weight=w, eps=1e-6, cos=cos, sin=sin, heads=heads, out=keys,
                               position=torch.tensor([start]), v=v)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("tokens, num_experts, top_k", [(1, 4, 1), (5, 5, 2), (37, 64, 8), (3, 64, 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_route_matches_softmax_topk(dtype, tokens, num_experts, top_k, norm):
    # distinct logits (no ties), exactly representable in bfloat16
    order = torch.stack([torch.randperm(num_experts, generator=torch.Generator().manual_seed(t))
                         for t in range(tokens)])
    logits = ((order - num_experts / 2) / 8).to(dtype)
    weights, ids = fused_ops.route(logits, top_k=top_k, norm_topk_prob=norm)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    ref_w, ref_i = torch.topk(probs, top_k, dim=-1)
    if norm:
        ref_w = ref_w / ref_w.sum(dim=-1, keepdim=True)
    assert ids.dtype == torch.int64 and torch.equal(ids, ref_i)
    assert weights.dtype == dtype
    torch.testing.assert_close(weights.float(), ref_w.to(dtype).float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-6)


def test_route_breaks_ties_towards_the_lower_expert():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0]])
    weights, ids = fused_ops.route(logits, top_k=4, norm_topk_prob=False)
    assert ids.tolist() == [[1, 3, 2, 4]] and weights[0, 0] == weights[0, 1]
    with pytest.raises(ValueError, match="top_k 6 not in 1..5"):
        fused_ops.route(logits, top_k=6, norm_topk_prob=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul(dtype):
    h = randn(7, 2 * 40, dtype=dtype)
    gate, up = h.chunk(2, dim=-1)
    assert_close(fused_ops.silu_mul(h), F.silu(gate) * up)
    assert fused_ops.silu_mul(h[:0]).shape == (0, 40)


def experts(*, num_experts=6, hidden=48, inter=24, dtype=torch.float32):
    return (randn(num_experts, 2 * inter, hidden, dtype=dtype, seed=3) / 4,
            randn(num_experts, hidden, inter, dtype=dtype, seed=4) / 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ids", [[2], [5, 0], [0, 1, 2, 3, 4, 5]])
def test_moe_decode_matches_gather(dtype, ids):
    gate_up, down = experts(dtype=dtype)
    x = randn(1, 48, dtype=dtype, seed=5)
    ids_t = torch.tensor([ids])
    weights = torch.softmax(randn(1, len(ids), dtype=torch.float32, seed=6), -1).to(dtype)
    out = fused_ops.moe_decode(x=x, ids=ids_t, weights=weights, gate_up=gate_up, down=down)
    ref = experts_gather(x=x, ids=ids_t, weights=weights, gate_up=gate_up, down=down, act=F.silu)
    assert out.shape == (1, 48) and out.dtype == dtype
    assert_close(out, ref)


def test_moe_decode_reads_only_the_chosen_experts():
    gate_up, down = experts()
    chosen = torch.tensor([[4, 1]])
    for e in set(range(6)) - {4, 1}:
        gate_up[e], down[e] = float("nan"), float("nan")
    out = fused_ops.moe_decode(x=randn(1, 48, dtype=torch.float32), ids=chosen, weights=torch.tensor([[0.7, 0.3]]),
                               gate_up=gate_up, down=down)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("num_experts", [1, 5, 64])
@pytest.mark.parametrize("tokens, top_k", [(1, 1), (5, 3), (37, 8), (300, 8)])
def test_moe_sort_is_the_stable_sort_with_its_inverse_and_offsets(num_experts, tokens, top_k):
    """One program per expert, in blocks of up to 2048 pairs (300 x 8 pairs take two blocks)."""
    ids = torch.randint(0, num_experts, (tokens, top_k), generator=torch.Generator().manual_seed(tokens))
    perm, inverse, rows, offsets = fused_ops.moe_sort(ids, num_experts=num_experts)
    ref = sort_pairs(ids=ids, num_experts=num_experts)            # torch.sort, searchsorted, scatter
    assert perm.dtype == inverse.dtype == rows.dtype == torch.int64 and offsets.dtype == torch.int32
    assert torch.equal(perm, torch.sort(ids.reshape(-1), stable=True).indices)
    assert torch.equal(perm, ref.perm) and torch.equal(inverse, ref.inverse) and torch.equal(offsets, ref.offsets)
    assert torch.equal(inverse[perm], torch.arange(tokens * top_k)) and torch.equal(rows, perm // top_k)
    with pytest.raises(ValueError, match="tokens, top_k"):
        fused_ops.moe_sort(ids.reshape(-1), num_experts=num_experts)


def test_moe_sort_leaves_experts_without_pairs_empty_runs():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3]])
    pairs = sort_pairs(ids=ids, num_experts=6, kernel=True)
    assert pairs.perm.tolist() == [1, 4, 3, 0, 2, 5]
    assert pairs.offsets.tolist() == [2, 3, 3, 6, 6, 6]


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_combine_matches_gather_and_sum(dtype, residual):
    tokens, top_k, hidden = 5, 3, 40
    ids = torch.randint(0, 6, (tokens, top_k), generator=torch.Generator().manual_seed(0))
    pairs = sort_pairs(ids=ids, num_experts=6)
    y = randn(tokens * top_k, hidden, dtype=dtype)
    weights = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(1)).to(dtype)
    res = randn(tokens, hidden, dtype=dtype, seed=2) if residual else None
    ref = _combine(y=y, pairs=pairs, weights=weights, residual=res, dtype=dtype)
    assert_close(fused_ops.moe_combine(y=y, inverse=pairs.inverse, weights=weights, residual=res), ref)


def test_moe_combine_in_token_slot_order():
    tokens, top_k, hidden = 4, 3, 24
    y = randn(tokens * top_k, hidden, dtype=torch.float32)
    weights = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(1))
    ref = (y.view(tokens, top_k, hidden) * weights[..., None]).sum(dim=1)
    assert_close(fused_ops.moe_combine(y=y, inverse=None, weights=weights), ref)


# -- the fused prefill MoE -------------------------------------------------------------------------
def routed(*, tokens, num_experts, top_k, seed=0):
    """Distinct expert ids per token, never the last expert (so some expert receives no pair), and router
    weights that sum to one per token."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=gen)
    scores[:, -1] = -1.0
    ids = torch.topk(scores, top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1)
    return ids, weights


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("tokens, num_experts, top_k", [(1, 4, 1), (5, 8, 3), (37, 8, 2), (37, 4, 3)])
def test_moe_align_pads_each_expert_run_to_whole_tiles(block_m, tokens, num_experts, top_k):
    ids, _ = routed(tokens=tokens, num_experts=num_experts, top_k=top_k)
    pairs_sorted = sort_pairs(ids=ids, num_experts=num_experts, kernel=True)
    perm = pairs_sorted.perm
    tile_expert, tile_pairs = fused_ops.moe_align(perm=perm, offsets=pairs_sorted.offsets, block_m=block_m)
    pairs = tokens * top_k
    assert tile_expert.shape == (-(-pairs // block_m) + num_experts,) and tile_pairs.shape == (tile_expert.numel() * block_m,)
    rows = tile_pairs.view(-1, block_m)
    real = tile_pairs[tile_pairs != pairs].long()
    assert sorted(real.tolist()) == list(range(pairs))                        # every pair exactly once
    assert torch.equal(real, perm)                                             # in sorted (stable) order
    used = tile_expert >= 0
    count = int(used.sum())
    assert bool(used[:count].all()) and bool((tile_expert[count:] == -1).all())   # used tiles first
    assert bool((rows[count:] == pairs).all())                                 # unused tiles: all padding
    flat_ids = ids.reshape(-1)
    for tile in range(count):
        mine = rows[tile][rows[tile] != pairs].long()
        assert mine.numel() > 0 and bool((flat_ids[mine] == tile_expert[tile]).all())   # one expert per tile
        assert bool((rows[tile][mine.numel():] == pairs).all())               # padding only at the end
    assert tile_expert[:count].tolist() == sorted(tile_expert[:count].tolist())
    counts = torch.bincount(flat_ids, minlength=num_experts)
    assert count == int(((counts + block_m - 1) // block_m).sum())


SMALL = fused_ops.MoeConfig(32, 16, 16, 2, 4, 3)     # several K steps, N blocks and tile groups on small shapes
SPLIT = fused_ops.MoeConfig.parse("32,16,16,2,4,3/32,32,1,4,2")     # the down GEMM with tiles of its own


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, num_experts, top_k, hidden, inter, config",
                         [(1, 4, 1, 32, 16, None), (1, 8, 3, 64, 48, None), (5, 4, 2, 32, 16, None),
                          (5, 8, 3, 48, 40, SMALL), (37, 8, 2, 64, 48, None), (37, 4, 3, 32, 24, SMALL),
                          (37, 8, 1, 48, 32, SMALL), (37, 4, 3, 64, 32, SPLIT)])
def test_fused_prefill_moe_matches_grouped_and_loop(dtype, tokens, num_experts, top_k, hidden, inter, config):
    gen = torch.Generator().manual_seed(tokens + top_k)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / 4).to(dtype)
    down = (torch.randn(num_experts, hidden, inter, generator=gen) / 4).to(dtype)
    ids, weights = routed(tokens=tokens, num_experts=num_experts, top_k=top_k, seed=tokens)
    weights = weights.to(dtype)
    out = experts_fused(x=x, ids=ids, weights=weights, gate_up=gate_up, down=down, config=config)
    args = dict(x=x, ids=ids, weights=weights, gate_up=gate_up, down=down, act=F.silu)
    for ref in (experts_grouped(**args, mm=grouped_mm_function(), fused=True), experts_loop(**args)):
        if dtype == torch.float32:    # two GEMMs summed in other orders: absolute error relative to the largest value
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        else:
            assert_close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_prefill_moe_loads_weight_tiles_through_tma_descriptors(dtype):
    """Tiles that divide I and H go through TMA descriptors (the interpreter emulates them): same result."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 48, generator=gen).to(dtype)
    gate_up, down = (torch.randn(8, 64, 48, generator=gen) / 4).to(dtype), (torch.randn(8, 48, 32, generator=gen) / 4).to(dtype)
    ids, weights = routed(tokens=37, num_experts=8, top_k=2, seed=3)
    args = dict(x=x, ids=ids, weights=weights.to(dtype), gate_up=gate_up, down=down, config=SMALL)
    assert fused_ops.weight_descriptors(gate_up=gate_up, down=down, config=SMALL) is not None
    assert fused_ops.weight_descriptors(gate_up=gate_up, down=down, config=SMALL, enabled=False) is None
    ref = experts_fused(**args, tma=False)
    paired = dataclasses.replace(SMALL, paired=True)     # gate and up tiles in one TMA load and one dot
    assert fused_ops.weight_descriptors(gate_up=gate_up, down=down, config=paired)[0].block_shape == [2, 16, 16]
    for out in (experts_fused(**args, tma=True), experts_fused(**{**args, "config": paired}, tma=True)):
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(out, ref)
    wide = fused_ops.MoeConfig(32, 64, 16, 2, 4, 3)       # 64-row tiles would cross I = 32
    assert fused_ops.weight_descriptors(gate_up=gate_up, down=down, config=wide) is None
    with pytest.raises(ValueError, match="do not divide I=32 and H=48"):
        experts_fused(**{**args, "config": wide}, tma=True)


def test_fused_prefill_moe_reads_only_routed_experts():
    gate_up, down = experts()
    ids = torch.tensor([[4, 1], [1, 2], [4, 2]])
    for e in set(range(6)) - {1, 2, 4}:
        gate_up[e], down[e] = float("nan"), float("nan")
    out = experts_fused(x=randn(3, 48, dtype=torch.float32), ids=ids, weights=torch.full((3, 2), 0.5),
                        gate_up=gate_up, down=down)
    assert bool(torch.isfinite(out).all())


def test_moe_config_table_and_override(monkeypatch):
    monkeypatch.delenv(fused_ops.MOE_CONFIG_ENV, raising=False)
    assert fused_ops.moe_config(num_pairs=8, num_experts=64).block_m == 16
    assert fused_ops.moe_config(num_pairs=1900 * 8, num_experts=64) == fused_ops.MOE_CONFIGS[2][1]   # 237.5 per expert
    assert fused_ops.moe_config(num_pairs=3000 * 8, num_experts=64) == fused_ops.MOE_CONFIGS[-1][1]
    monkeypatch.setenv(fused_ops.MOE_CONFIG_ENV, "128,64,32,4,8,4")
    assert fused_ops.moe_config(num_pairs=8, num_experts=64) == fused_ops.MoeConfig(128, 64, 32, 4, 8, 4)
    monkeypatch.setenv(fused_ops.MOE_CONFIG_ENV, "8,64,64,1,4,3")
    with pytest.raises(ValueError, match="BM,BN,BK,GM,warps,stages with BM, BN, BK >= 16"):
        fused_ops.moe_config(num_pairs=8, num_experts=64)


@pytest.mark.parametrize("text, gate_up, down", [
    ("128,128,64,8,8,3", (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3)),
    ("128,128,64,8,8,3/256,64,4,8,4", (128, 128, 64, 8, 8, 3), (128, 256, 64, 4, 8, 4)),
    ("128,64,64,1,8,3,paired/256,64,1,8,4", (128, 64, 64, 1, 8, 3), (128, 256, 64, 1, 8, 4)),
])
def test_moe_config_text_gives_each_gemm_its_tiles(text, gate_up, down):
    config = fused_ops.MoeConfig.parse(text)
    fields = lambda c: (c.block_m, c.block_n, c.block_k, c.group_m, c.num_warps, c.num_stages)  # noqa: E731
    assert fields(config) == gate_up and fields(config.down_gemm) == down
    assert str(config) == text and fused_ops.MoeConfig.parse(str(config)) == config
    assert config.paired == ("paired" in text) and not config.down_gemm.paired


@pytest.mark.parametrize("text, problem", [("128,128,64,8,8", "want BM,BN,BK"), ("128,128,64,8,8,3/256,64,4,8", "want BM,BN,BK"),
                                           ("128,x,64,8,8,3", "want BM,BN,BK"), ("128,128,64,8,8,3/8,64,4,8,4", "BN, BK >= 16"),
                                           ("128,128,64,0,8,3", "others >= 1")])
def test_moe_config_rejects_bad_text(text, problem):
    with pytest.raises(ValueError, match=problem):
        fused_ops.MoeConfig.parse(text)
    with pytest.raises(ValueError, match="shares BM=128"):
        fused_ops.MoeConfig(128, 128, 64, 8, 8, 3, down=fused_ops.MoeConfig(64, 128, 64, 8, 8, 3))


# -- the whole decoder ----------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [Knobs(max_crops=1), Knobs(max_crops=1, top_k=2, active_blocks=2,
                                                                 block_policy="random")], ids=["full", "reduced"])
@pytest.mark.parametrize("prefill_moe", ["grouped", "fused"])
def test_triton_decoder_matches_hf(knobs, prefill_moe):
    fast = make_flexmoe(backend="fast", kernels="triton", decode_moe="fused", prefill_moe=prefill_moe)
    assert (fast.fast.kernels, fast.fast.decode_moe, fast.fast.prefill_moe) == ("triton", "fused", prefill_moe)
    smp = sample(500, 400)
    _, l_hf, t_hf, _ = generate(make_flexmoe(), knobs, smp, steps=3)
    _, l_fa, t_fa, _ = generate(fast, knobs, smp, steps=3)
    assert t_fa == t_hf
    for a, b in zip(l_fa, l_hf):
        assert rel_err(a, b) < 1e-4


def test_kernel_choices_are_checked(monkeypatch):
    act, cpu = torch.nn.SiLU(), torch.device("cpu")
    with pytest.raises(ValueError, match="kernels 'cuda' is not one of triton, torch"):
        check_kernels(kernels="cuda", decode_moe="grouped", prefill_moe="grouped", device=cpu, act=act)
    with pytest.raises(ValueError, match="compute SiLU; this model's activation is GELU"):
        check_kernels(kernels="triton", decode_moe="grouped", prefill_moe="grouped", device=cpu, act=torch.nn.GELU())
    with pytest.raises(ValueError, match="compute SiLU; this model's activation is GELU"):
        check_kernels(kernels="torch", decode_moe="gather", prefill_moe="fused", device=cpu, act=torch.nn.GELU())
    check_kernels(kernels="torch", decode_moe="gather", prefill_moe="loop", device=cpu, act=torch.nn.GELU())
    monkeypatch.setattr(fused_ops, "triton", None)
    for decode_moe, prefill_moe in (("fused", "grouped"), ("gather", "fused")):
        with pytest.raises(ValueError, match=r"need Triton on CUDA \(Triton is not installed\)"):
            check_kernels(kernels="torch", decode_moe=decode_moe, prefill_moe=prefill_moe, device=cpu, act=act)
    with pytest.raises(ValueError, match=r"prefill_moe 'fused' need Triton on CUDA"):
        make_flexmoe(backend="fast", kernels="torch", decode_moe="gather", prefill_moe="fused")
    with pytest.raises(ValueError, match="kernels 'tpu' is not one of triton, torch"):
        make_flexmoe(backend="fast", kernels="tpu")


def test_prefill_moe_fused_is_a_spec_option():
    text = """
name: t
experiment: fast
model: {family: flexmoe, preset: tiny, dtype: float32, device: cpu, backend: fast, options: {prefill_moe: fused}}
datasets: [{name: probe_grid, num_samples: 1}]
knobs: {top_k: [1]}
"""
    assert check_semantics(load_spec_text(text, source="x")) == []
    with pytest.raises(SpecError, match="prefill_moe 'fuse' is not one of grouped, loop, fused"):
        load_spec_text(text.replace("prefill_moe: fused", "prefill_moe: fuse"), source="x")
