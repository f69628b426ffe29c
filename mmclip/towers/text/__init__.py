"""Text towers: native CLIP text transformer and any Hugging Face encoder."""

from mmclip.towers.text.clip_text import ClipTextTransformer
from mmclip.towers.text.hf_tower import HFTextTower

__all__ = ["ClipTextTransformer", "HFTextTower"]
