"""Datasets. Importing this package registers every dataset in ``DATASETS``."""
from flexvlm_ray.data.base import DATASETS, DatasetEntry, Sample, register_dataset, shard_indices  # noqa: F401
from flexvlm_ray.data import probe  # noqa: F401  (registers 'probe_grid')
from flexvlm_ray.data import shapes  # noqa: F401  (registers 'shapes_vqa', 'shapes_caption', 'shapes_mc', 'shapes_count')
from flexvlm_ray.data import hf  # noqa: F401  (registers the nine Hugging Face datasets)
