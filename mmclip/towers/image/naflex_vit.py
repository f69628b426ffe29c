"""NaFlex ViT (SigLIP 2): a ViT that takes each image at its own aspect ratio as a variable number of patches.

Patches come flattened ((p, p, C) each) and go through a linear patch embedding. The learned position grid is
resized per image to that image's patch grid (bilinear, antialiased, as SigLIP 2's reference). Padding patches
are masked out of every attention and of the attention-pooling head. Plain (B, C, H, W) image batches are taken
too, as full grids of H/p x W/p patches, so square data and every evaluation road work unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.data.naflex import NaFlexImages, NaFlexPreprocess, patchify
from mmclip.layers.norm import LayerNorm
from mmclip.layers.pooling import build_pooler
from mmclip.layers.transformer import Transformer
from mmclip.outputs import TowerOutput
from mmclip.registry import IMAGE_TOWERS
from mmclip.towers.base import BaseTower, DataConfig, check_images

__all__ = ["NaFlexVisionTransformer"]


@IMAGE_TOWERS.register("naflex_vit")
class NaFlexVisionTransformer(BaseTower):
    """SigLIP 2's NaFlex vision tower.

    Args:
        patch_size: square patch size.
        width, layers, heads, mlp_ratio, act, ln_eps: the transformer (as ``clip_vit``).
        pos_grid: side of the learned position grid (16 for 256 positions).
        max_num_patches: the preprocessing's patch budget per image (``preprocess``).
        image_size: the square size of plain image batches and of ``data_config`` (default pos_grid * patch).
        in_chans, mean, std, interpolation: the images.
    """

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
        self.data_config = DataConfig((size, size), tuple(mean), tuple(std), interpolation, "squash")
        self.patch_embed = nn.Linear(in_chans * patch_size * patch_size, width)
        self.pos_embed = nn.Parameter(torch.randn(pos_grid * pos_grid, width) * width**-0.5)
        self.transformer = Transformer(width, layers, heads or max(1, width // 64), mlp_ratio, act, ln_eps)
        self.transformer.init_weights()
        self.norm_post = LayerNorm(width, eps=ln_eps)
        self.pool = build_pooler(
            {"name": "map", "heads": heads, "mlp_ratio": mlp_ratio, "act": act, "ln_eps": ln_eps}, width
        )

    def preprocess(self) -> NaFlexPreprocess:
        """The PIL preprocessing this tower's weights expect (native aspect ratio, ``max_num_patches``)."""
        dc = self.data_config
        return NaFlexPreprocess(self.patch_size, self.max_num_patches, dc.mean, dc.std, dc.interpolation)

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        return [[self.patch_embed, self.pos_embed], *[[b] for b in self.transformer.blocks], [self.norm_post, self.pool]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _as_naflex(self, images: torch.Tensor | NaFlexImages) -> NaFlexImages:
        if isinstance(images, NaFlexImages):
            return images
        check_images(images, self, self.in_chans)
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"{type(self).__name__} takes images whose sides are multiples of {p}, got {H}x{W}")
        patches = torch.stack([patchify(im, p) for im in images]) if B else images.new_zeros(0, 0, p * p * 3)
        grid = torch.tensor([[H // p, W // p]], device=images.device).expand(B, 2)
        mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=images.device)
        return NaFlexImages(patches, mask, grid)

    def position_embeddings(self, grid: torch.Tensor, length: int) -> torch.Tensor:
        """(B, 2) patch grids -> (B, length, D): the learned grid resized to each image's, padded with zeros."""
        D = self.pos_embed.shape[1]
        table = self.pos_embed.reshape(self.pos_grid, self.pos_grid, D).permute(2, 0, 1)[None].float()
        out = self.pos_embed.new_zeros(grid.shape[0], length, D)
        resized: dict[tuple[int, int], torch.Tensor] = {}
        for i, (h, w) in enumerate(grid.tolist()):
            if (h, w) not in resized:
                r = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
                resized[(h, w)] = r[0].permute(1, 2, 0).reshape(h * w, D).to(self.pos_embed.dtype)
            out[i, : h * w] = resized[(h, w)]
        return out

    def _embed(self, batch: NaFlexImages) -> torch.Tensor:
        x = self.patch_embed(batch.patches.to(self.patch_embed.weight.dtype))  # (B, N, D)
        return x + self.position_embeddings(batch.grid, x.shape[1]).to(x.dtype)

    def forward(self, images: torch.Tensor | NaFlexImages) -> TowerOutput:
        batch = self._as_naflex(images)
        mask = batch.mask.to(batch.patches.device)
        x = self.transformer(self._embed(batch), attn_mask=mask[:, None, None, :])
        x = self.norm_post(x)
        return TowerOutput(pooled=self.pool(x, mask), tokens=x, mask=mask)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, pos_grid={self.pos_grid}, max_num_patches={self.max_num_patches}"


def spec_from_hf_siglip2_vision(config: Any, max_num_patches: int, mean: Any, std: Any) -> dict[str, Any]:
    """The ``naflex_vit`` spec of a ``Siglip2VisionConfig``."""
    from mmclip.models.convert.hf import _act

    grid = math.isqrt(config.num_patches)
    if grid * grid != config.num_patches:
        raise ValueError(f"Siglip2 num_patches={config.num_patches} is not a square position grid")
    return {
        "name": "naflex_vit",
        "patch_size": config.patch_size,
        "width": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "act": _act(config.hidden_act),
        "ln_eps": config.layer_norm_eps,
        "pos_grid": grid,
        "max_num_patches": max_num_patches,
        "in_chans": config.num_channels,
        "mean": tuple(mean),
        "std": tuple(std),
    }
