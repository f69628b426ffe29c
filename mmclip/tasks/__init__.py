"""LightningModules: the only place (with data modules and callbacks) that imports lightning."""

from mmclip.tasks.captioning import CaptioningTask
from mmclip.tasks.contrastive import ContrastiveTask, build_model_config
from mmclip.tasks.featurizer import FeaturizerTask
from mmclip.tasks.optim import build_optimizer, build_scheduler, param_groups

__all__ = [
    "CaptioningTask",
    "ContrastiveTask",
    "FeaturizerTask",
    "build_model_config",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
]
