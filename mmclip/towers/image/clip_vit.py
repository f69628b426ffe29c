"""CLIP Vision Transformer (OpenAI / OpenCLIP layout), also the SigLIP variant.

patchify conv -> [class token] + learned positions -> (patch dropout) -> ln_pre -> blocks -> ln_post -> pool.
The dual encoder owns the projection to the shared embedding; this tower returns the pooled width-D
vector and the normalised patch tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.layers.norm import LayerNorm
from mmclip.layers.pooling import build_pooler
from mmclip.layers.transformer import Transformer
from mmclip.outputs import TowerOutput
from mmclip.registry import IMAGE_TOWERS
from mmclip.towers.base import (
    OPENAI_MEAN,
    OPENAI_STD,
    BaseTower,
    DataConfig,
    check_images,
    resolve_layer_indices,
)

__all__ = ["ClipVisionTransformer", "resample_pos_embed"]

logger = logging.getLogger(__name__)


def _pair(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix: int = 1, mode: str = "bicubic"
) -> torch.Tensor:
    """Resizes learned (P + N, D) position embeddings to a new patch grid (P prefix tokens kept).

    The old grid must be square (as in all CLIP checkpoints).
    """
    prefix, grid = pos_embed[:num_prefix], pos_embed[num_prefix:]  # (P, D), (N, D)
    old = int(math.isqrt(grid.shape[0]))
    if old * old != grid.shape[0]:
        raise ValueError(f"cannot resample a non-square position grid of {grid.shape[0]} tokens")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(grid, size=new_grid, mode=mode, antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, dim).to(pos_embed.dtype)  # (N', D)
    return torch.cat([prefix, grid], dim=0)


@IMAGE_TOWERS.register("clip_vit", aliases=("vit",))
class ClipVisionTransformer(BaseTower):
    """Vision Transformer as in CLIP.

    Args:
        image_size: input size in pixels (int or (H, W)).
        patch_size: square patch size.
        width: token width.
        layers: number of blocks.
        heads: attention heads (default width // 64).
        mlp_ratio: MLP hidden width / width.
        act: "gelu", "quick_gelu" (OpenAI weights) or "gelu_tanh" (SigLIP).
        class_token: prepend a learned class token.
        patch_bias: bias on the patchify conv (SigLIP has one, CLIP does not).
        pre_norm: LayerNorm before the blocks (ln_pre).
        pool: "cls", "mean" (over patch tokens) or "map" (attention pooling head).
        ln_eps: LayerNorm epsilon (1e-5 CLIP, 1e-6 SigLIP).
        layer_scale_init: per-channel residual scale init, or None.
        patch_dropout: fraction of patch tokens dropped in training (FLIP).
        norm_after_pool: apply ``norm_post`` to the pooled vector (and to each token) after pooling, not to the
            tokens before it (OpenCLIP's ``final_ln_after_pool``, CLIPA).
        mean, std, interpolation, resize_mode: preprocessing, exposed as ``data_config``.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        width: int = 768,
        layers: int = 12,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        class_token: bool = True,
        patch_bias: bool = False,
        pre_norm: bool = True,
        pool: str = "cls",
        ln_eps: float = 1e-5,
        layer_scale_init: float | None = None,
        patch_dropout: float = 0.0,
        in_chans: int = 3,
        mean: tuple[float, ...] = OPENAI_MEAN,
        std: tuple[float, ...] = OPENAI_STD,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        norm_after_pool: bool = False,
    ) -> None:
        super().__init__()
        if pool == "cls" and not class_token:
            raise ValueError("pool='cls' needs class_token=True; use pool='mean' or 'map'")
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {patch_dropout}")
        self.image_size = _pair(image_size)
        self.patch_size = patch_size
        if self.image_size[0] < patch_size or self.image_size[1] < patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than one patch ({patch_size})")
        # a size that is not a multiple of the patch leaves its last pixels unseen, as in timm (SigLIP 384 / 14)
        self.grid_size = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
        self.width = width
        self.output_dim = width
        self.num_prefix = 1 if class_token else 0
        self.pool_type = pool
        self.norm_after_pool = norm_after_pool
        self.patch_dropout = patch_dropout
        self.data_config = DataConfig(self.image_size, tuple(mean), tuple(std), interpolation, resize_mode)

        scale = width**-0.5
        self.patch_embed = nn.Conv2d(in_chans, width, patch_size, stride=patch_size, bias=patch_bias)
        self.cls_token = nn.Parameter(scale * torch.randn(width)) if class_token else None
        num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix
        self.pos_embed = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.norm_pre = LayerNorm(width, eps=ln_eps) if pre_norm else nn.Identity()
        self.transformer = Transformer(
            width, layers, heads or max(1, width // 64), mlp_ratio, act, ln_eps, layer_scale_init
        )
        self.transformer.init_weights()
        self.norm_post = LayerNorm(width, eps=ln_eps)
        pool_spec: Any = (
            {"name": "map", "heads": heads, "mlp_ratio": mlp_ratio, "act": act, "ln_eps": ln_eps}
            if pool == "map"
            else pool
        )
        self.pool = build_pooler(pool_spec, width)

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        embed: list[nn.Module | nn.Parameter] = [self.patch_embed, self.pos_embed, self.norm_pre]
        if self.cls_token is not None:
            embed.append(self.cls_token)
        return [embed, *[[b] for b in self.transformer.blocks], [self.norm_post, self.pool]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Keeps the prefix tokens and a random max(1, int(N * (1 - p))) patches per sample (FLIP)."""
        prefix, patches = x[:, : self.num_prefix], x[:, self.num_prefix :]  # (B, P, D), (B, N, D)
        B, N, D = patches.shape
        keep = max(1, int(N * (1.0 - self.patch_dropout)))
        idx = torch.rand(B, N, device=x.device).topk(keep, dim=1).indices  # (B, K)
        patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
        return torch.cat([prefix, patches], dim=1)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, P + N, D) tokens entering the blocks."""
        check_images(x, self, self.patch_embed.in_channels)
        if x.shape[-2:] != self.image_size:
            raise ValueError(
                f"{type(self).__name__} expects images of {self.image_size[0]}x{self.image_size[1]}, got "
                f"{tuple(x.shape[-2:])}: preprocess with the tower's data_config, or build the tower with "
                f"image_size={tuple(x.shape[-2:])} (position embeddings are resampled when loading weights)"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        x = x + self.pos_embed.to(x.dtype)
        if self.patch_dropout > 0.0 and self.training:
            x = self._drop_patches(x)
        return self.norm_pre(x)

    def _head(self, x: torch.Tensor) -> TowerOutput:
        """(B, P + N, D) block output -> ln_post, pooled vector and patch tokens."""
        if self.norm_after_pool:
            pooled = self.pool(x if self.pool_type == "cls" else x[:, self.num_prefix :])  # (B, D)
            return TowerOutput(pooled=self.norm_post(pooled), tokens=self.norm_post(x[:, self.num_prefix :]))
        x = self.norm_post(x)  # (B, P + N, D)
        tokens = x[:, self.num_prefix :]  # (B, N, D)
        pooled = self.pool(x if self.pool_type == "cls" else tokens)  # (B, D); cls reads the prefix token
        return TowerOutput(pooled=pooled, tokens=tokens)

    def forward(self, x: torch.Tensor) -> TowerOutput:
        return self._head(self.transformer(self._embed(x)))

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int]
    ) -> tuple[TowerOutput, list[torch.Tensor]]:
        """The forward output plus the patch tokens (B, N, D) after each block in ``indices``.

        Intermediates are the raw residual stream (before ``ln_post``) without the prefix tokens, in the
        order of ``indices`` (negative ones count from the last block). No activation checkpointing.
        """
        take = resolve_layer_indices(indices, len(self.transformer.blocks))
        wanted, kept = set(take), {}
        x = self._embed(x)
        for i, block in enumerate(self.transformer.blocks):
            x = block(x)  # (B, P + N, D)
            if i in wanted:
                kept[i] = x[:, self.num_prefix :]  # (B, N, D)
        return self._head(x), [kept[i] for i in take]
