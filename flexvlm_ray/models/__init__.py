"""Model families. Each is registered in ``MODELS`` by a lazy name: its module (and torch) is imported
on the first ``MODELS.get``. Families of other packages register through the entry-point group
``flexvlm_ray.models`` (``name = package.module:AdapterClass``)."""
from flexvlm_ray.models.base import MODELS, ModelAdapter, ModelInfo, Knobs, Prepared, DecodeState, register_model  # noqa: F401

FAMILIES = {
    "simulated": "flexvlm_ray.models.simulated:SimulatedAdapter",
    "flexmoe": "flexvlm_ray.models.flexmoe:FlexMoeAdapter",
    "qwen3_vl_moe": "flexvlm_ray.models.qwen3_vl_moe:Qwen3VLMoeAdapter",
    "molmo2": "flexvlm_ray.models.molmo2:Molmo2Adapter",
    "molmo_remote": "flexvlm_ray.models.molmo_remote:MolmoRemoteAdapter",
}
for _name, _target in FAMILIES.items():
    MODELS.register_lazy(_name, _target)
