"""Poolers: (B, N, D) tokens (+ optional (B, N) mask) -> (B, D). Registered in ``POOLERS``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.layers.norm import LayerNorm
from mmclip.layers.transformer import get_activation
from mmclip.registry import POOLERS

__all__ = ["ClsPool", "MeanPool", "LastPool", "MapPool", "build_pooler"]


@POOLERS.register("cls", aliases=("first", "tok"))
class ClsPool(nn.Module):
    """The first token."""

    def __init__(self, width: int | None = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x[:, 0]


@POOLERS.register("mean", aliases=("avg",))
class MeanPool(nn.Module):
    """Mean over tokens, over the real ones only when a mask is given."""

    def __init__(self, width: int | None = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x.mean(dim=1)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


@POOLERS.register("last")
class LastPool(nn.Module):
    """The last token, or the last real token when a mask is given."""

    def __init__(self, width: int | None = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x[:, -1]
        last = mask.long().cumsum(dim=1).argmax(dim=1)  # (B,) index of the last True
        return x[torch.arange(x.shape[0], device=x.device), last]


@POOLERS.register("map")
class MapPool(nn.Module):
    """Multi-head attention pooling with one learned probe, then LN + MLP with a residual (SigLIP)."""

    def __init__(
        self,
        width: int,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        act: str = "gelu_tanh",
        ln_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.heads = heads or max(1, width // 64)
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm = LayerNorm(width, eps=ln_eps)
        hidden = int(width * mlp_ratio + 1e-6)  # as timm and OpenCLIP (int), robust to ratios read back as fc1 / width
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(width, hidden))
        self.mlp.add_module("act", get_activation(act))
        self.mlp.add_module("fc2", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        H = self.heads
        w_q, w_kv = self.qkv.weight.split([C, 2 * C])
        b_q, b_kv = self.qkv.bias.split([C, 2 * C])
        q = (
            F.linear(self.probe.expand(B, -1, -1), w_q, b_q).view(B, 1, H, C // H).transpose(1, 2)
        )  # (B, H, 1, d)
        kv = F.linear(x, w_kv, b_kv).view(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)  # (2, B, H, N, d)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask)  # (B, H, 1, d)
        out = self.proj(out.transpose(1, 2).reshape(B, 1, C))  # (B, 1, C)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


def build_pooler(spec: str | dict[str, Any], width: int) -> nn.Module:
    """Builds a pooler from a name or ``{"name": ..., **kwargs}`` for tokens of width ``width``."""
    return POOLERS.build(spec, width=width)
