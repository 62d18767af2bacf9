"""Model families. Importing this package registers every family in ``MODELS``."""
from flexvlm_ray.models.base import MODELS, ModelAdapter, ModelInfo, Knobs, Prepared, DecodeState, register_model  # noqa: F401
from flexvlm_ray.models import simulated  # noqa: F401  (registers 'simulated')
from flexvlm_ray.models import flexmoe  # noqa: F401  (registers 'flexmoe')
from flexvlm_ray.models import qwen3_vl_moe  # noqa: F401  (registers 'qwen3_vl_moe')
from flexvlm_ray.models import molmo2  # noqa: F401  (registers 'molmo2')
from flexvlm_ray.models import molmo_remote  # noqa: F401  (registers 'molmo_remote')
