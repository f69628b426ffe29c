"""Torch-only building blocks shared by the towers and reuse components."""

from mmclip.layers.gated_xattn import GatedCrossAttentionBlock
from mmclip.layers.norm import FrozenBatchNorm2d, LayerNorm, freeze_batch_norm
from mmclip.layers.perceiver import PerceiverAttention, PerceiverBlock, PerceiverResampler
from mmclip.layers.pooling import ClsPool, LastPool, MapPool, MeanPool, build_pooler
from mmclip.layers.projection import Mlp, build_projection
from mmclip.layers.transformer import Attention, QuickGELU, Transformer, TransformerBlock, get_activation

__all__ = [
    "Attention",
    "ClsPool",
    "FrozenBatchNorm2d",
    "GatedCrossAttentionBlock",
    "LastPool",
    "LayerNorm",
    "MapPool",
    "MeanPool",
    "Mlp",
    "PerceiverAttention",
    "PerceiverBlock",
    "PerceiverResampler",
    "QuickGELU",
    "Transformer",
    "TransformerBlock",
    "build_pooler",
    "build_projection",
    "freeze_batch_norm",
    "get_activation",
]
