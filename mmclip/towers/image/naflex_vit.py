"""NaFlex ViT (SigLIP 2): a ViT that takes each image at its own aspect ratio as a variable number of patches.

Patches come flattened ((p, p, C) each) and go through a linear patch embedding. The learned position grid is
resized per image to that image's patch grid (bilinear, antialiased, as SigLIP 2's reference). Padding patches
are masked out of every attention and of the attention-pooling head. Plain (B, C, H, W) image batches are taken
too, as full grids of H/p x W/p patches, so square data and every evaluation road work unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.layers.norm import LayerNorm
from mmclip.layers.pooling import build_pooler
from mmclip.layers.transformer import Transformer
from mmclip.outputs import TowerOutput
from mmclip.registry import IMAGE_TOWERS
from mmclip.towers.base import BaseTower, DataConfig, check_images

__all__ = ["NaFlexImages", "NaFlexSample", "NaFlexVisionTransformer", "patchify"]


@dataclass
class NaFlexSample:
    """One preprocessed image: ``patches`` (n, p * p * C), row-major over its ``grid`` of (rows, cols)."""

    patches: torch.Tensor
    grid: tuple[int, int]


@dataclass
class NaFlexImages:
    """A padded batch of NaFlex images.

    Attributes:
        patches: (B, N, p * p * C) float patches, each flattened as (p, p, C); padding rows are zero.
        mask: (B, N) bool, True for an image's own patches.
        grid: (B, 2) long, each image's patch grid (rows, cols); rows * cols of its patches are real.
    """

    patches: torch.Tensor
    mask: torch.Tensor
    grid: torch.Tensor

    def to(self, *args: Any, **kwargs: Any) -> NaFlexImages:
        """Moves (and casts the patches, as ``Tensor.to`` does) the batch; mask and grid keep their dtypes."""
        patches = self.patches.to(*args, **kwargs)
        return NaFlexImages(patches, self.mask.to(patches.device), self.grid.to(patches.device))

    def __len__(self) -> int:
        return self.patches.shape[0]

    def __getitem__(self, index: Any) -> NaFlexImages:
        """The images at ``index`` (an int, slice or index tensor over the batch), still a batch."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return NaFlexImages(self.patches[index], self.mask[index], self.grid[index])

    @property
    def device(self) -> torch.device:
        return self.patches.device

    def image(self, index: int, channels: int = 3) -> torch.Tensor:
        """Image ``index`` as a ``(C, rows * p, cols * p)`` tensor, its patches put back in place."""
        rows, cols = (int(v) for v in self.grid[index].tolist())
        p = math.isqrt(self.patches.shape[-1] // channels)
        x = self.patches[index, : rows * cols].reshape(rows, cols, p, p, channels)
        return x.permute(4, 0, 2, 1, 3).reshape(channels, rows * p, cols * p)

    def pin_memory(self) -> NaFlexImages:
        return NaFlexImages(self.patches.pin_memory(), self.mask.pin_memory(), self.grid.pin_memory())

    @staticmethod
    def cat(parts: list[NaFlexImages]) -> NaFlexImages:
        """One batch of the images of ``parts`` in order, padded to the longest part's patch count."""
        n = max(p.patches.shape[1] for p in parts)
        patches = [F.pad(p.patches, (0, 0, 0, n - p.patches.shape[1])) for p in parts]  # (b, n, D) each
        masks = [F.pad(p.mask, (0, n - p.mask.shape[1])) for p in parts]  # (b, n) each
        return NaFlexImages(torch.cat(patches), torch.cat(masks), torch.cat([p.grid for p in parts]))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., H/p * W/p, p * p * C): patches in row-major order, each flattened as (p, p, C)."""
    *lead, c, h, w = images.shape
    rows, cols = h // patch_size, w // patch_size
    x = images[..., : rows * patch_size, : cols * patch_size]
    x = x.reshape(*lead, c, rows, patch_size, cols, patch_size)
    x = x.permute(*range(len(lead)), -4, -2, -3, -1, -5)  # (..., rows, cols, p, p, C)
    return x.reshape(*lead, rows * cols, patch_size * patch_size * c)


@IMAGE_TOWERS.register("naflex_vit")
class NaFlexVisionTransformer(BaseTower):
    """SigLIP 2's NaFlex vision tower.

    Args:
        patch_size: square patch size.
        width, layers, heads, mlp_ratio, act, ln_eps: the transformer (as ``clip_vit``).
        pos_grid: side of the learned position grid (16 for 256 positions).
        max_num_patches: the preprocessing's patch budget per image (``data_config.extra["naflex"]``, which
            ``mmclip.data.naflex.NaFlexPreprocess.from_data_config`` and ``create_model_and_transforms`` read).
        image_size: the square size of plain image batches and of ``data_config`` (default pos_grid * patch).
        in_chans, mean, std, interpolation: the images.
    """

    takes_naflex = True  # DualEncoder lets NaFlexImages through to towers that say so

    def __init__(
        self,
        patch_size: int = 16,
        width: int = 768,
        layers: int = 12,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        act: str = "gelu_tanh",
        ln_eps: float = 1e-6,
        pos_grid: int = 16,
        max_num_patches: int = 256,
        image_size: int | None = None,
        in_chans: int = 3,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pos_grid = pos_grid
        self.max_num_patches = max_num_patches
        self.in_chans = in_chans
        self.output_dim = width
        size = image_size or pos_grid * patch_size
        naflex = {"patch_size": patch_size, "max_num_patches": max_num_patches}  # mmclip.data.naflex reads it
        self.data_config = DataConfig((size, size), tuple(mean), tuple(std), interpolation, "squash", {"naflex": naflex})
        self.patch_embed = nn.Linear(in_chans * patch_size * patch_size, width)
        self.pos_embed = nn.Parameter(torch.randn(pos_grid * pos_grid, width) * width**-0.5)
        self.transformer = Transformer(width, layers, heads or max(1, width // 64), mlp_ratio, act, ln_eps)
        self.transformer.init_weights()
        self.norm_post = LayerNorm(width, eps=ln_eps)
        self.pool = build_pooler(
            {"name": "map", "heads": heads, "mlp_ratio": mlp_ratio, "act": act, "ln_eps": ln_eps}, width
        )

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        return [[self.patch_embed, self.pos_embed], *[[b] for b in self.transformer.blocks], [self.norm_post, self.pool]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _grid_embeddings(self, h: int, w: int) -> torch.Tensor:
        """(h * w, D): the learned position grid resized to an h x w patch grid (bilinear, antialiased)."""
        D = self.pos_embed.shape[1]
        table = self.pos_embed.reshape(self.pos_grid, self.pos_grid, D).permute(2, 0, 1)[None].float()
        resized = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return resized[0].permute(1, 2, 0).reshape(h * w, D).to(self.pos_embed.dtype)

    def position_embeddings(self, grid: torch.Tensor, length: int) -> torch.Tensor:
        """(B, 2) patch grids -> (B, length, D): each image's resized grid, padded with zeros."""
        out = self.pos_embed.new_zeros(grid.shape[0], length, self.pos_embed.shape[1])
        resized: dict[tuple[int, int], torch.Tensor] = {}
        for i, (h, w) in enumerate(grid.tolist()):  # one host read per batch: the sizes are shapes
            if (h, w) not in resized:
                resized[(h, w)] = self._grid_embeddings(h, w)
            out[i, : h * w] = resized[(h, w)]
        return out

    def forward(self, images: torch.Tensor | NaFlexImages) -> TowerOutput:
        if isinstance(images, NaFlexImages):
            mask = images.mask.to(images.patches.device)
            x = self.patch_embed(images.patches.to(self.patch_embed.weight.dtype))  # (B, N, D)
            x = x + self.position_embeddings(images.grid, x.shape[1]).to(x.dtype)
            attn_mask: torch.Tensor | None = mask[:, None, None, :]
        else:  # a full grid for every image: one resized table, no mask (the fused attention kernels stay open)
            check_images(images, self, self.in_chans)
            H, W = images.shape[-2:]
            p = self.patch_size
            if H % p or W % p:
                raise ValueError(f"{type(self).__name__} takes images whose sides are multiples of {p}, got {H}x{W}")
            x = self.patch_embed(patchify(images, p).to(self.patch_embed.weight.dtype))  # (B, N, D)
            x = x + self._grid_embeddings(H // p, W // p).to(x.dtype)
            mask = attn_mask = None
        x = self.norm_post(self.transformer(x, attn_mask=attn_mask))
        return TowerOutput(pooled=self.pool(x, mask), tokens=x, mask=mask)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, pos_grid={self.pos_grid}, max_num_patches={self.max_num_patches}"
