"""molmoe-1b on a GPU: built directly on CUDA in bf16 (never on the CPU), one sample through every
stage, and the knobs applied in place. Deselected where CUDA is unavailable (see conftest.py)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from flexvlm_ray.data.base import Sample
from flexvlm_ray.models import MODELS, Knobs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def molmoe():
    adapter = MODELS.get("flexmoe")(preset="molmoe-1b", path=None, dtype="bfloat16", device="cuda", seed=0,
                                    options={})
    yield adapter
    del adapter
    torch.cuda.empty_cache()


def run(adapter, knobs: Knobs = Knobs(), steps: int = 4):
    sample = Sample(sample_id="g", image=Image.new("RGB", (640, 512), (30, 60, 90)), prompt="what color is the car ?")
    prepared = adapter.prepare(sample=sample, knobs=knobs)
    features = adapter.vision_encoder(prepared)
    embeds = adapter.projector(prepared, features)
    state = adapter.prefill(prepared, embeds)
    for _ in range(steps):
        adapter.decode_step(state)
    adapter.synchronize()
    return prepared, features, embeds, state


def test_molmoe_built_on_cuda_in_bf16(molmoe):
    params = list(molmoe.model.parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in params)
    total = sum(p.numel() for p in params)
    assert 7.0e9 < total < 7.5e9
    assert molmoe.experts_implementation in ("grouped_mm", "batched_mm", "eager")


def test_molmoe_one_sample_through_all_stages(molmoe):
    prepared, features, embeds, state = run(molmoe)
    assert prepared.num_crops == 7
    assert prepared.num_vision_tokens == 144 + 20 * 28
    assert features.shape == (7, 576, 2048)
    assert embeds.shape == (7 * 144, 2048)
    assert len(state.tokens) == 5 and state.position == prepared.num_total_tokens + 4
    assert torch.isfinite(state.extras["logits"].float()).all()


def test_molmoe_knobs_apply_and_restore(molmoe):
    _, _, _, ref = run(molmoe, steps=0)
    molmoe.apply_knobs(Knobs(top_k=2, active_blocks=8, block_policy="prefix"))
    assert all(r.top_k == 2 for r in molmoe.moe_routers()) and len(molmoe.decoder_blocks()) == 8
    _, _, _, changed = run(molmoe, steps=2)
    assert len(changed.tokens) == 3
    molmoe.restore_knobs()
    _, _, _, again = run(molmoe, steps=0)
    assert torch.equal(again.extras["logits"], ref.extras["logits"])
