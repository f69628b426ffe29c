"""Image and text towers. Importing this package registers every built-in tower."""

from mmclip.towers.base import DataConfig, Tower
from mmclip.towers.image import ClipModifiedResNet, ClipVisionTransformer, PrecomputedTower, TimmTower
from mmclip.towers.text import ClipTextTransformer, HFTextTower

__all__ = [
    "ClipModifiedResNet",
    "ClipTextTransformer",
    "ClipVisionTransformer",
    "DataConfig",
    "HFTextTower",
    "PrecomputedTower",
    "TimmTower",
    "Tower",
]
