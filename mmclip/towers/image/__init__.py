"""Image towers: native CLIP ViT and modified ResNet, and any timm model."""

from mmclip.towers.image.clip_resnet import ClipModifiedResNet
from mmclip.towers.image.clip_vit import ClipVisionTransformer
from mmclip.towers.image.timm_tower import TimmTower

__all__ = ["ClipModifiedResNet", "ClipVisionTransformer", "TimmTower"]
