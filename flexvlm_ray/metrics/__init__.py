"""Quality metrics. Importing this package registers every metric in ``METRICS``."""
from flexvlm_ray.metrics.base import METRICS, Metric, register_metric  # noqa: F401
