"""The FlexVLM controller: per request and latency budget, which knobs to run (E4).

Importable with torch, numpy, pandas and scipy only (no Ray): ``space`` (the configurations),
``features`` (what is known before the vision encoder runs), ``estimate`` (per-request estimates
from the E3 estimator and the seeds' FLOPs, and the guardrail), ``env`` (the row-built environment
and its oracle), ``learned`` (the policy network), ``policies`` (the registry and the Controller),
``build`` (a Controller from a run's training rows), ``loop`` (the closed loop a worker runs),
``trained`` (the ``learned:<trainer>`` policies: the learned network trained by an E5 trainer).
"""
from flexvlm_ray.control.estimate import CandidateModel, Guardrail
from flexvlm_ray.control.env import RowEnvironment
from flexvlm_ray.control.features import Featurizer, Request, RequestFeatures
from flexvlm_ray.control.policies import POLICIES, Controller, Decision, policy_label, register_policy
from flexvlm_ray.control.space import ConfigSpace, knobs_key
from flexvlm_ray.control import trained as _trained  # noqa: F401,E402  (registers the learned:<trainer> policies)

__all__ = ["CandidateModel", "ConfigSpace", "Controller", "Decision", "Featurizer", "Guardrail", "POLICIES",
           "Request", "RequestFeatures", "RowEnvironment", "knobs_key", "policy_label", "register_policy"]
