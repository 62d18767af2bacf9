"""The flexmoe ``fast`` backend on a GPU: molmoe-1b in bf16 against the ``hf`` backend on the same
weights (one model, switched in place), CUDA-graph replay against eager fast decoding, and the grouped
GEMM prefill. Deselected where CUDA is unavailable (``pytest -m gpu`` runs it)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from flexvlm_ray.data.base import Sample
from flexvlm_ray.models import MODELS, Knobs

pytestmark = pytest.mark.gpu

BF16_REL = 2e-2
STEPS = 4


@pytest.fixture(scope="module")
def molmoe():
    adapter = MODELS.get("flexmoe")(preset="molmoe-1b", path=None, dtype="bfloat16", device="cuda", seed=0,
                                    options={}, backend="fast")
    yield adapter
    del adapter
    torch.cuda.empty_cache()


def sample(width: int = 640, height: int = 512) -> Sample:
    return Sample(sample_id="g", image=Image.new("RGB", (width, height), (30, 60, 90)), prompt="what color is the car ?")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(adapter, knobs: Knobs, *, steps: int = STEPS, forced: list[int] | None = None, smp: Sample | None = None):
    """Logits (float32 copies) and tokens of prefill and ``steps`` decode steps; ``forced`` feeds those
    tokens instead of the chosen ones (teacher forcing), so both backends see the same sequence."""
    adapter.apply_knobs(knobs)
    try:
        prepared = adapter.prepare(sample=smp or sample(), knobs=knobs)
        state = adapter.prefill(prepared, adapter.projector(prepared, adapter.vision_encoder(prepared)))
        logits, tokens = [state.extras["logits"].float().clone()], [state.next_token]
        for i in range(steps):
            if forced is not None:
                state.next_token = forced[i]
            tokens.append(adapter.decode_step(state))
            logits.append(state.extras["logits"].float().clone())
        adapter.synchronize()
        return logits, tokens
    finally:
        adapter.restore_knobs()


def clear_margin(logits: torch.Tensor) -> bool:
    """Whether the top-1 logit beats the top-2 by more than bf16 noise (then greedy choices must agree)."""
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1]) > BF16_REL * float(logits.abs().max())


@pytest.mark.parametrize("knobs", [Knobs(), Knobs(top_k=1), Knobs(top_k=32, active_blocks=8, block_policy="prefix"),
                                   Knobs(top_k=2, active_blocks=12, block_policy="random", max_crops=12)],
                         ids=["default", "k1", "k32-b8", "k2-b12random-c12"])
def test_fast_matches_hf_in_bf16(molmoe, knobs):
    molmoe.set_backend(backend="hf", options={"experts_implementation": "eager"})
    try:
        ref_logits, ref_tokens = run(molmoe, knobs)
    finally:
        molmoe.set_backend(backend="fast")
    logits, tokens = run(molmoe, knobs, forced=ref_tokens[:-1])
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert rel_err(a, b) < BF16_REL, f"step {step}"
        if clear_margin(b):
            assert tokens[step] == ref_tokens[step], f"step {step}"


def test_graph_replay_matches_eager_fast(molmoe):
    knobs = Knobs(top_k=4, active_blocks=12, block_policy="prefix")
    assert molmoe.fast.use_graphs
    graph_logits, graph_tokens = run(molmoe, knobs, steps=8)
    molmoe.fast.use_graphs = False
    try:
        eager_logits, eager_tokens = run(molmoe, knobs, steps=8)
    finally:
        molmoe.fast.use_graphs = True
    assert graph_tokens == eager_tokens
    assert max(rel_err(a, b) for a, b in zip(graph_logits, eager_logits)) < 1e-3
    assert any(key[0] == tuple(range(12)) and key[1] == (4,) * 12 for key in molmoe.fast.graphs)


def test_graphs_across_a_kv_bucket_boundary(molmoe):
    knobs = Knobs(top_k=8, active_blocks=4, block_policy="prefix")
    prepared = molmoe.prepare(sample=sample(), knobs=knobs)
    steps = molmoe.fast.kv_bucket - prepared.num_total_tokens % molmoe.fast.kv_bucket + 3
    graph_logits, graph_tokens = run(molmoe, knobs, steps=steps)
    buckets = {key[2] for key in molmoe.fast.graphs if key[0] == (0, 1, 2, 3)}
    assert len(buckets) >= 2
    molmoe.fast.use_graphs = False
    try:
        _, eager_tokens = run(molmoe, knobs, steps=steps)
    finally:
        molmoe.fast.use_graphs = True
    assert graph_tokens == eager_tokens


def test_grouped_decode_moe_under_graphs_matches_gather(molmoe):
    knobs = Knobs(top_k=8)
    ref_logits, ref_tokens = run(molmoe, knobs)
    molmoe.set_backend(backend="fast", options={"decode_moe": "grouped"})
    try:
        logits, tokens = run(molmoe, knobs, forced=ref_tokens[:-1])
    finally:
        molmoe.set_backend(backend="fast")
    assert max(rel_err(a, b) for a, b in zip(logits, ref_logits)) < BF16_REL


def test_grouped_gemm_prefill_is_used_on_hopper(molmoe):
    assert molmoe.fast.prefill_moe == "grouped"
    molmoe.set_backend(backend="fast", options={"prefill_moe": "loop"})
    try:
        loop_logits, _ = run(molmoe, Knobs(), steps=0)
    finally:
        molmoe.set_backend(backend="fast")
    grouped_logits, _ = run(molmoe, Knobs(), steps=0)
    assert rel_err(grouped_logits[0], loop_logits[0]) < BF16_REL
