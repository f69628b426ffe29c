"""Perceiver resampler (Flamingo): a fixed number of learned latents read a variable number of tokens.

Per layer: the latents attend to the concatenation of the (normalised) media tokens and themselves,
then a feed-forward block; both residual, then a final LayerNorm. Several images (or video frames) per
sample are resampled independently into one latent set each, told apart by optional learned time
(media) and frame embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.layers.norm import LayerNorm

__all__ = ["PerceiverAttention", "PerceiverBlock", "PerceiverResampler"]


class PerceiverAttention(nn.Module):
    """Latents attend to [media; latents].

    Queries come from LN(latents), keys and values from concat(LN(media), LN(latents)); no biases.

    Args:
        dim: token and latent width.
        heads: attention heads.
        dim_head: width per head (``heads * dim_head`` need not equal ``dim``).
        ln_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm_media = LayerNorm(dim, eps=ln_eps)
        self.norm_latents = LayerNorm(dim, eps=ln_eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention update of the latents (without the residual).

        Args:
            media: (B, S, D) media tokens.
            latents: (B, n, D) latents.
            mask: (B, S) bool, True for real media tokens; the latents are always attended.

        Returns:
            (B, n, D).
        """
        B, S, _ = media.shape
        n = latents.shape[1]
        H, d = self.heads, self.dim_head
        latents_n = self.norm_latents(latents)  # (B, n, D)
        kv_input = torch.cat([self.norm_media(media), latents_n], dim=1)  # (B, S + n, D)
        q = self.to_q(latents_n).view(B, n, H, d).transpose(1, 2)  # (B, H, n, d)
        k, v = self.to_kv(kv_input).view(B, S + n, 2, H, d).permute(2, 0, 3, 1, 4)  # (B, H, S + n, d) each
        attn_mask = None
        if mask is not None:
            keep = torch.cat([mask, mask.new_ones(B, n)], dim=1)  # (B, S + n)
            attn_mask = keep[:, None, None, :]  # (B, 1, 1, S + n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, n, d)
        return self.to_out(out.transpose(1, 2).reshape(B, n, H * d))  # (B, n, D)


class PerceiverBlock(nn.Module):
    """latents + attn(media, latents), then latents + FF(latents), FF = LN, Linear, GELU, Linear (no biases)."""

    def __init__(
        self, dim: int, heads: int = 8, dim_head: int = 64, ff_mult: int = 4, ln_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, heads, dim_head, ln_eps)
        self.ff = nn.Sequential()
        self.ff.add_module("norm", LayerNorm(dim, eps=ln_eps))
        self.ff.add_module("fc1", nn.Linear(dim, dim * ff_mult, bias=False))
        self.ff.add_module("act", nn.GELU())
        self.ff.add_module("fc2", nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(
        self, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        latents = latents + self.attn(media, latents, mask)  # (B, n, D)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Resamples media tokens into ``num_latents`` latents per image / video.

    Accepted inputs (``D = dim``; ``N`` tokens per image or frame):

    - (B, N, D): one image per sample;
    - (B, T, N, D): ``T`` images per sample, each resampled on its own;
    - (B, T, F, N, D): ``T`` media of ``F`` frames each; the ``F * N`` tokens of a media are resampled
      together (frame embeddings tell the frames apart).

    The optional ``mask`` has the input's shape without ``D`` ((B, N), (B, T, N) or (B, T, F, N)), True
    for real tokens; padding tokens are never attended (the latents always are). The output is
    (B, T, num_latents, D), with T = 1 for (B, N, D) inputs.

    Args:
        dim: token width (a frozen tower's ``token_dim``).
        depth: number of blocks.
        num_latents: learned latents per media.
        heads: attention heads.
        dim_head: width per head.
        ff_mult: feed-forward hidden width / dim.
        max_num_media: learned time embeddings for up to this many media per sample (None: none).
        max_num_frames: learned frame embeddings for up to this many frames per media (None: none).
        ln_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        depth: int = 6,
        num_latents: int = 64,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        max_num_media: int | None = None,
        max_num_frames: int | None = None,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.output_dim = dim
        self.num_latents = num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.media_time_embed = nn.Parameter(torch.randn(max_num_media, dim)) if max_num_media else None
        self.frame_embed = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.blocks = nn.ModuleList(
            PerceiverBlock(dim, heads, dim_head, ff_mult, ln_eps) for _ in range(depth)
        )
        self.norm = LayerNorm(dim, eps=ln_eps)

    def _as_5d(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input and mask as (B, T, F, N, D) and (B, T, F, N)."""
        if x.ndim not in (3, 4, 5) or x.shape[-1] != self.dim:
            raise ValueError(
                f"PerceiverResampler expects (B, N, {self.dim}), (B, T, N, {self.dim}) or "
                f"(B, T, F, N, {self.dim}) tokens, got shape {tuple(x.shape)}"
            )
        if mask is not None and (mask.shape != x.shape[:-1] or mask.dtype != torch.bool):
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(x.shape[:-1])} (the input's without the "
                f"width), got {mask.dtype} {tuple(mask.shape)}"
            )
        if x.ndim == 3:  # (B, N, D): one media of one frame
            x = x[:, None, None]
        elif x.ndim == 4:  # (B, T, N, D): T media of one frame
            x = x[:, :, None]
        mask = mask.reshape(x.shape[:-1]) if mask is not None else None
        return x, mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Resampled latents (B, T, num_latents, D); see the class docstring for shapes."""
        x, mask = self._as_5d(x, mask)  # (B, T, F, N, D), (B, T, F, N)
        B, T, Fr, N, D = x.shape
        if self.frame_embed is not None:
            if Fr > self.frame_embed.shape[0]:
                raise ValueError(f"{Fr} frames per media exceed max_num_frames={self.frame_embed.shape[0]}")
            x = x + self.frame_embed[:Fr, None].to(x.dtype)  # (F, 1, D) over (B, T, F, N, D)
        if self.media_time_embed is not None:
            if T > self.media_time_embed.shape[0]:
                raise ValueError(
                    f"{T} media per sample exceed max_num_media={self.media_time_embed.shape[0]}"
                )
            x = x + self.media_time_embed[:T, None, None].to(x.dtype)  # (T, 1, 1, D)
        media = x.reshape(B * T, Fr * N, D)  # (B T, F N, D)
        flat_mask = mask.reshape(B * T, Fr * N) if mask is not None else None
        latents = self.latents.to(x.dtype).expand(B * T, -1, -1)  # (B T, n, D)
        for block in self.blocks:
            latents = block(media, latents, flat_mask)
        return self.norm(latents).view(B, T, self.num_latents, D)  # (B, T, n, D)
