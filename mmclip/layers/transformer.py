"""Pre-LN transformer blocks with attention through ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmclip.layers.norm import LayerNorm

__all__ = ["QuickGELU", "get_activation", "Attention", "TransformerBlock", "Transformer"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
}


def get_activation(name: str) -> nn.Module:
    """Builds an activation by name: gelu, gelu_tanh, quick_gelu or relu."""
    if name not in _ACTIVATIONS:
        raise KeyError(f"unknown activation {name!r}; known: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]()


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Args:
        width: model width.
        heads: number of heads; ``width`` must divide evenly.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)  # (B, H, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class TransformerBlock(nn.Module):
    """Pre-LN residual block: x + attn(norm1(x)), then x + mlp(norm2(x)); optional layer scale."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        ln_eps: float = 1e-5,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio + 1e-6)  # as timm and OpenCLIP (int), robust to ratios read back as fc1 / width
        self.norm1 = LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.norm2 = LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(width, hidden))
        self.mlp.add_module("act", get_activation(act))
        self.mlp.add_module("fc2", nn.Linear(hidden, width))
        if layer_scale_init is not None:
            self.gamma1 = nn.Parameter(torch.full((width,), float(layer_scale_init)))
            self.gamma2 = nn.Parameter(torch.full((width,), float(layer_scale_init)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        a = self.attn(self.norm1(x), attn_mask=attn_mask, causal=causal)
        x = x + (a * self.gamma1 if self.gamma1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (m * self.gamma2 if self.gamma2 is not None else m)


class Transformer(nn.Module):
    """A stack of TransformerBlocks with optional activation checkpointing."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        ln_eps: float = 1e-5,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, act, ln_eps, layer_scale_init) for _ in range(layers)
        )
        self.grad_checkpointing = False

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, causal=causal)
        return x

    def init_weights(
        self, proj_std: float | None = None, attn_std: float | None = None, fc_std: float | None = None
    ) -> None:
        """CLIP initialisation: qkv std w^-0.5, output projections w^-0.5 (2L)^-0.5, fc1 (2w)^-0.5."""
        w, n = self.width, len(self.blocks)
        attn_std = w**-0.5 if attn_std is None else attn_std
        proj_std = (w**-0.5) * ((2 * n) ** -0.5) if proj_std is None else proj_std
        fc_std = (2 * w) ** -0.5 if fc_std is None else fc_std
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
