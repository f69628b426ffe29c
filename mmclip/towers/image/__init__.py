"""Image towers: native CLIP ViT and modified ResNet, NaFlex ViT (SigLIP 2), any timm model, and precomputed
embeddings."""

from mmclip.towers.image.clip_resnet import ClipModifiedResNet
from mmclip.towers.image.clip_vit import ClipVisionTransformer
from mmclip.towers.image.naflex_vit import NaFlexVisionTransformer
from mmclip.towers.image.precomputed import PrecomputedTower
from mmclip.towers.image.timm_tower import TimmTower

__all__ = ["ClipModifiedResNet", "ClipVisionTransformer", "NaFlexVisionTransformer", "PrecomputedTower", "TimmTower"]
