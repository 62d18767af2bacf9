"""The fast backend's Triton kernels, run by Triton's CPU interpreter (conftest sets TRITON_INTERPRET):
each kernel against the eager code it replaces, in float32 and bfloat16, and the whole ``kernels:
triton`` + ``decode_moe: fused`` decoder against the hf backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexvlm_ray.models import Knobs, fused_ops
from flexvlm_ray.models.fast_decoder import (_unsort_and_combine, apply_rotary, check_kernels, experts_gather,
                                             rms_norm, rotary)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_combine_matches_scatter_and_sum(dtype):
    tokens, top_k, hidden = 5, 3, 40
    ids = torch.randint(0, 6, (tokens, top_k), generator=torch.Generator().manual_seed(0))
    _, perm = torch.sort(ids.reshape(-1))
    y = randn(tokens * top_k, hidden, dtype=dtype)
    weights = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = _unsort_and_combine(y=y, perm=perm, weights=weights, num_tokens=tokens, top_k=top_k, dtype=dtype)
    assert_close(fused_ops.moe_combine(y=y, perm=perm, weights=weights), ref)


# -- the whole decoder ----------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [Knobs(max_crops=1), Knobs(max_crops=1, top_k=2, active_blocks=2,
                                                                 block_policy="random")], ids=["full", "reduced"])
def test_triton_decoder_matches_hf(knobs):
    fast = make_flexmoe(backend="fast", kernels="triton", decode_moe="fused", prefill_moe="grouped")
    assert (fast.fast.kernels, fast.fast.decode_moe) == ("triton", "fused")
    smp = sample(500, 400)
    _, l_hf, t_hf, _ = generate(make_flexmoe(), knobs, smp, steps=3)
    _, l_fa, t_fa, _ = generate(fast, knobs, smp, steps=3)
    assert t_fa == t_hf
    for a, b in zip(l_fa, l_hf):
        assert rel_err(a, b) < 1e-4


def test_kernel_choices_are_checked(monkeypatch):
    act = torch.nn.SiLU()
    with pytest.raises(ValueError, match="kernels 'cuda' is not one of triton, torch"):
        check_kernels(kernels="cuda", decode_moe="grouped", device=torch.device("cpu"), act=act)
    with pytest.raises(ValueError, match="compute SiLU; this model's activation is GELU"):
        check_kernels(kernels="triton", decode_moe="grouped", device=torch.device("cpu"), act=torch.nn.GELU())
    check_kernels(kernels="torch", decode_moe="gather", device=torch.device("cpu"), act=torch.nn.GELU())
    monkeypatch.setattr(fused_ops, "triton", None)
    with pytest.raises(ValueError, match=r"need Triton on CUDA \(Triton is not installed\)"):
        check_kernels(kernels="torch", decode_moe="fused", device=torch.device("cpu"), act=act)
    with pytest.raises(ValueError, match="kernels 'tpu' is not one of triton, torch"):
        make_flexmoe(backend="fast", kernels="tpu")
