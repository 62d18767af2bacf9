"""Model families. Each is registered in ``MODELS`` by a lazy name: its module (and torch) is imported
on the first ``MODELS.get``. Families of other packages register through the entry-point group
``flexvlm_ray.models`` (``name = package.module:AdapterClass``). ``describe_model`` answers a spec's
shape questions; a family listed in ``DESCRIBERS`` does so without importing its adapter (or torch)."""
from typing import Any, Optional

from flexvlm_ray.models.base import MODELS, ModelAdapter, ModelInfo, Knobs, Prepared, DecodeState, register_model  # noqa: F401

FAMILIES = {
    "simulated": "flexvlm_ray.models.simulated:SimulatedAdapter",
    "flexmoe": "flexvlm_ray.models.flexmoe.adapter:FlexMoeAdapter",
    "qwen3_vl_moe": "flexvlm_ray.models.qwen3_vl_moe.adapter:Qwen3VLMoeAdapter",
    "molmo2": "flexvlm_ray.models.molmo2.adapter:Molmo2Adapter",
    "molmo_remote": "flexvlm_ray.models.molmo_remote.adapter:MolmoRemoteAdapter",
}
for _name, _target in FAMILIES.items():
    MODELS.register_lazy(_name, _target)

# family -> "module:function" with the signature of ModelAdapter.describe, importing no torch
DESCRIBERS = {"flexmoe": "flexvlm_ray.models.flexmoe.config:describe"}


def describe_model(family: str, *, preset: Optional[str], path: Optional[str], options: dict[str, Any]) -> ModelInfo:
    """The family's ``ModelInfo`` (shape, knob limits, backends) without loading weights."""
    from flexvlm_ray.registry import load_object

    fn = load_object(DESCRIBERS[family]) if family in DESCRIBERS else MODELS.get(family).describe
    return fn(preset=preset, path=path, options=options)
