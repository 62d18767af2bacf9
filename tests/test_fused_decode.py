"""``fused_decode``: a decode step's block in fewer Triton kernels, run by Triton's CPU interpreter
(conftest sets TRITON_INTERPRET) against the kernels and eager code they replace (the reference), and the
whole decoder with ``fused_decode: true`` against the default fused decoder and hf. GPU shapes:
tests/test_fast_backend_gpu.py (``pytest -m gpu``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexvlm_ray.models import Knobs
from flexvlm_ray.models.flexmoe.fast import ops as fused_ops
from flexvlm_ray.models.flexmoe.fast.decoder import experts_gather, rms_norm, route
from model_support import generate, make_flexmoe, rel_err, sample
from test_fused_ops import DTYPES, assert_close, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows, n_cols", [(48, 64), (40, 72), (8, 1200)])
def test_norm_gemv_matches_rms_norm_then_linear(dtype, n_rows, n_cols):
    x, w = randn(1, n_cols, dtype=dtype), randn(n_rows, n_cols, dtype=dtype, seed=1) / n_cols ** 0.5
    nw = 1 + 0.1 * randn(n_cols, dtype=dtype, seed=2)
    normed = torch.empty(1, n_cols, dtype=dtype)
    out = fused_ops.gemv(x, w, norm_weight=nw, eps=1e-5, normed_out=normed)
    ref_normed = rms_norm(x, nw, 1e-5)
    assert_close(out, F.linear(ref_normed, w))
    assert_close(normed, ref_normed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_with_residual_matches_linear_plus_residual(dtype):
    x, w = randn(1, 96, dtype=dtype), randn(40, 96, dtype=dtype, seed=1) / 10
    res = randn(1, 40, dtype=dtype, seed=3)
    assert_close(fused_ops.gemv(x, w, residual=res), res + F.linear(x, w))
    assert_close(fused_ops.gemv(x, w), F.linear(x, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts, top_k, norm_topk", [(8, 1, False), (8, 3, False), (64, 8, False), (6, 2, True)])
def test_norm_route_matches_norm_router_and_route(dtype, experts, top_k, norm_topk):
    hidden = 80
    x = randn(1, hidden, dtype=dtype, seed=4)
    nw = 1 + 0.1 * randn(hidden, dtype=dtype, seed=5)
    router = randn(experts, hidden, dtype=dtype, seed=6)
    normed, weights, ids = fused_ops.norm_route(x, norm_weight=nw, eps=1e-6, router=router, top_k=top_k,
                                                norm_topk_prob=norm_topk)
    ref_normed = rms_norm(x, nw, 1e-6)
    ref_w, ref_i = route(x=ref_normed, weight=router, top_k=top_k, norm_topk_prob=norm_topk)
    assert_close(normed, ref_normed)
    if dtype == torch.float32:      # bf16 in the interpreter truncates, so near-equal experts may swap
        assert torch.equal(ids, ref_i)
        torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)
    assert ids.dtype == torch.int64 and weights.dtype == dtype and ids.shape == (1, top_k)


def test_norm_route_breaks_ties_to_the_lower_expert():
    hidden, experts = 16, 8
    router = torch.zeros(experts, hidden)
    router[[1, 3, 6]] = 1.0                              # experts 1, 3, 6 tie for the top
    _, weights, ids = fused_ops.norm_route(torch.ones(1, hidden), norm_weight=torch.ones(hidden), eps=1e-6,
                                           router=router, top_k=3, norm_topk_prob=False)
    assert ids.tolist() == [[1, 3, 6]]
    assert torch.allclose(weights[0, 0], weights[0, 2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_decode_with_residual_matches_moe_decode_plus_residual(dtype):
    experts, hidden, inter = 6, 48, 40
    gate_up = randn(experts, 2 * inter, hidden, dtype=dtype, seed=7) / 7
    down = randn(experts, hidden, inter, dtype=dtype, seed=8) / 6
    x, res = randn(1, hidden, dtype=dtype, seed=9), randn(1, hidden, dtype=dtype, seed=10)
    ids, weights = torch.tensor([[4, 1, 2]]), torch.tensor([[0.5, 0.3, 0.2]]).to(dtype)
    out = fused_ops.moe_decode(x=x, ids=ids, weights=weights, gate_up=gate_up, down=down, residual=res)
    plain = fused_ops.moe_decode(x=x, ids=ids, weights=weights, gate_up=gate_up, down=down)
    assert_close(out, res + plain)
    ref = experts_gather(x=x, ids=ids, weights=weights, gate_up=gate_up, down=down, act=F.silu)
    assert_close(out, res + ref)


@pytest.mark.parametrize("knobs", [Knobs(max_crops=1), Knobs(max_crops=1, top_k=2, active_blocks=2,
                                                                 block_policy="random")], ids=["full", "reduced"])
def test_fused_decode_decoder_matches_the_reference_decoder_and_hf(knobs):
    fused = make_flexmoe(backend="fast", kernels="triton", decode_moe="fused", prefill_moe="fused", fused_decode=True)
    assert fused.fast.fused_decode and all(b.fused_decode for b in fused.fast.blocks)
    reference = make_flexmoe(backend="fast", kernels="triton", decode_moe="fused", prefill_moe="fused")
    smp = sample(500, 400)
    _, l_ref, t_ref, _ = generate(reference, knobs, smp, steps=3)
    _, l_fu, t_fu, _ = generate(fused, knobs, smp, steps=3)
    _, l_hf, t_hf, _ = generate(make_flexmoe(), knobs, smp, steps=3)
    assert t_fu == t_ref == t_hf
    for a, b, c in zip(l_fu, l_ref, l_hf):
        assert rel_err(a, b) < 1e-5 and rel_err(a, c) < 1e-4


def test_fused_decode_option_is_checked():
    with pytest.raises(ValueError, match="fused_decode needs kernels 'triton' and decode_moe 'fused'"):
        make_flexmoe(backend="fast", kernels="triton", decode_moe="gather", prefill_moe="fused", fused_decode=True)
    with pytest.raises(ValueError, match="fused_decode must be true or false"):
        make_flexmoe(backend="fast", fused_decode="yes")
    with pytest.raises(ValueError, match="need backend 'fast'"):
        make_flexmoe(fused_decode=True)
