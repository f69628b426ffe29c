"""Flamingo's gated cross-attention: text tokens read visual latents through tanh gates that start closed.

Media masking: each text token attends only to the latents of the most recent image at or before it, given
as ``media_index`` (0: no image yet, t: the t-th image of the sample, counted from 1). A token without an
image attends to nothing and leaves the block unchanged, feed-forward included. With both gates at 0 (their
initial value) the block is the identity, so a frozen language model wrapped with such blocks starts out
computing exactly what it computed alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.layers.norm import LayerNorm

__all__ = ["GatedCrossAttentionBlock", "media_index"]


def media_index(ids: torch.Tensor, media_token_id: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) token ids -> (B, L) index of the most recent media token at or before each position (from 1;
    0 where there is none). ``start`` (B,) continues a count from an earlier chunk (generation with a cache)."""
    index = (ids == media_token_id).long().cumsum(dim=1)  # (B, L)
    return index if start is None else index + start[:, None]


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(a) * CrossAttn(LN(x), media), then x + tanh(f) * FF(LN(x)), only where a token has media.

    Args:
        dim: width of the text stream (the language model's hidden size).
        media_dim: width of the visual latents.
        heads: attention heads.
        dim_head: width per head.
        ff_mult: feed-forward hidden width / dim.
        ln_eps: LayerNorm epsilon.
    """

    def __init__(
        self, dim: int, media_dim: int, heads: int = 8, dim_head: int = 64, ff_mult: int = 4, ln_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm = LayerNorm(dim, eps=ln_eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential()
        self.ff.add_module("norm", LayerNorm(dim, eps=ln_eps))
        self.ff.add_module("fc1", nn.Linear(dim, dim * ff_mult, bias=False))
        self.ff.add_module("act", nn.GELU())
        self.ff.add_module("fc2", nn.Linear(dim * ff_mult, dim, bias=False))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, L, D) text hidden states.
            media: (B, T, n, Dm) latents of each sample's T images (n per image).
            index: (B, L) long, the image each token reads (1..T) or 0 for none (:func:`media_index`).

        Returns:
            (B, L, D).
        """
        B, L, _ = x.shape
        T, n = media.shape[1], media.shape[2]
        if T * n == 0:
            return x  # no image in the batch: nothing to read
        H, d = self.heads, self.dim_head
        has_media = (index > 0).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        q = self.to_q(self.norm(x)).view(B, L, H, d).transpose(1, 2)  # (B, H, L, d)
        kv = self.to_kv(media.reshape(B, T * n, -1).to(x.dtype))  # (B, T n, 2 H d)
        k, v = kv.view(B, T * n, 2, H, d).permute(2, 0, 3, 1, 4)  # (B, H, T n, d) each
        image_of_latent = torch.arange(1, T + 1, device=x.device).repeat_interleave(n)  # (T n,)
        allowed = index[:, :, None] == image_of_latent[None, None, :]  # (B, L, T n)
        allowed = allowed | (index == 0)[:, :, None]  # rows without media: any keys (masked out below)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (B, H, L, d)
        out = self.to_out(out.transpose(1, 2).reshape(B, L, H * d))  # (B, L, D)
        x = x + has_media * torch.tanh(self.attn_gate) * out
        return x + has_media * torch.tanh(self.ff_gate) * self.ff(x)
