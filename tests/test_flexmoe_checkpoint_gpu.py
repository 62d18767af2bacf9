"""A MolmoE checkpoint folder loaded straight onto the GPU (tensors read from the shards onto CUDA):
the hf and fast backends (Triton kernels, CUDA graphs) give the reference forward's logits in float32
under the knobs (within TF32 rounding: cuDNN may run the patch convolution in TF32), and bf16 stays
within bf16 rounding of it. Deselected where CUDA is unavailable."""
from __future__ import annotations

import pytest
import torch

import molmoe_support as ms
from flexvlm_ray.models import MODELS, Knobs
from model_support import rel_err
from test_flexmoe_checkpoint import reference, sample

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ms.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "molmoe-tiny")


@pytest.mark.parametrize("backend, dtype, tol", [("hf", "float32", 5e-3), ("fast", "float32", 5e-3),
                                                 ("hf", "bfloat16", 5e-2), ("fast", "bfloat16", 5e-2)])
@pytest.mark.parametrize("knobs", [Knobs(), Knobs(top_k=1, active_blocks=2, block_policy="prefix", max_crops=2)],
                         ids=["default", "k1-b2-c2"])
def test_gpu_logits_match_the_reference(folder, backend, dtype, tol, knobs, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXVLM_CACHE", str(tmp_path))
    extra = {} if backend == "hf" else {"backend": backend}
    adapter = MODELS.get("flexmoe")(preset=None, path=str(folder), dtype=dtype, device="cuda", seed=0, options={},
                                    **extra)
    assert all(p.device.type == "cuda" for p in adapter.model.parameters())
    adapter.apply_knobs(knobs)
    prepared = adapter.prepare(sample=sample(), knobs=knobs)
    state = adapter.prefill(prepared, adapter.projector(prepared, adapter.vision_encoder(prepared)))
    blocks = list(adapter.active_block_indices())
    cpu = type(prepared)(inputs={k: v.cpu().float() if v.is_floating_point() else v.cpu()
                                 for k, v in prepared.inputs.items()},
                         num_crops=prepared.num_crops, num_vision_tokens=prepared.num_vision_tokens,
                         num_language_tokens=prepared.num_language_tokens, num_total_tokens=prepared.num_total_tokens)
    weights = {n: t.float() for n, t in ms.random_tensors().items()}
    expected = reference(weights, cpu, top_k=knobs.top_k or ms.CONFIG["moe_top_k"], blocks=blocks)
    assert rel_err(state.extras["logits"].float().cpu(), expected) < tol
