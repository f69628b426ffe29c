"""LightningModules: the only place (with data modules and callbacks) that imports lightning."""

from mmclip.tasks.base import TrainingTask
from mmclip.tasks.captioning import CaptioningTask
from mmclip.tasks.contrastive import ContrastiveTask
from mmclip.tasks.featurizer import FeaturizerTask
from mmclip.tasks.optim import build_optimizer, build_scheduler, param_groups

__all__ = [
    "CaptioningTask",
    "ContrastiveTask",
    "FeaturizerTask",
    "TrainingTask",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
]
