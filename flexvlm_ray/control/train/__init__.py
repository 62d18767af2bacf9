"""Controller training strategies (E5): the row-built contextual bandit (``bandit``) and the
trainers registered by name (``trainers.TRAINERS``: lut, supervised, ppo, dpo, grpo), each producing
E4's ``learned`` policy network. No Ray here: ``run.controller_tune`` runs them as Ray Tune trials.
See docs/E5_TRAINING.md."""
from flexvlm_ray.control.train.bandit import BanditEnv, Evaluation, RewardSpec
from flexvlm_ray.control.train.trainers import TRAINERS, Trainer, TrainResult, make_trainer, register_trainer

__all__ = ["BanditEnv", "Evaluation", "RewardSpec", "TRAINERS", "TrainResult", "Trainer",
           "make_trainer", "register_trainer"]
