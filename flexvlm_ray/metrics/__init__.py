"""Quality metrics. Importing this package registers every metric in ``METRICS``."""
from flexvlm_ray.metrics.base import METRICS, Metric, register_metric  # noqa: F401
from flexvlm_ray.metrics import anls, cider, count, multiple_choice, vqa  # noqa: F401  (register)
