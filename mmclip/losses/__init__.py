"""Contrastive losses (registered in ``LOSSES``), feature exchange across processes, accumulation."""

from mmclip.losses.accumulation import cached_feature_step
from mmclip.losses.base import ContrastiveLoss, EmptyBatchError, clamp_logit_scale_
from mmclip.losses.clip import ClipLoss
from mmclip.losses.siglip import SigLipLoss, siglip_block

__all__ = [
    "ClipLoss",
    "ContrastiveLoss",
    "EmptyBatchError",
    "SigLipLoss",
    "cached_feature_step",
    "clamp_logit_scale_",
    "siglip_block",
]
