"""CLIP's modified ResNet (OpenAI layout).

Stem of three 3x3 convs and an average pool; bottlenecks that downsample with an average pool
(anti-aliasing) before the last 1x1 conv; attention pooling whose query is the mean token. The
attention pool ends in its own output projection, so ``output_dim`` is the embedding width and the
dual encoder uses projection "none" for this tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmclip.outputs import TowerOutput
from mmclip.registry import IMAGE_TOWERS
from mmclip.towers.base import OPENAI_MEAN, OPENAI_STD, BaseTower, DataConfig, resolve_layer_indices

__all__ = ["ClipModifiedResNet", "AttentionPool2d"]


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, act: bool = True) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        if act:
            self.add_module("act", nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> AvgPool(stride) -> 1x1 (x4 channels), shortcut AvgPool + 1x1 conv + BN when needed."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _ConvBN(cin, planes, 1)
        self.conv2 = _ConvBN(planes, planes, 3)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = _ConvBN(planes, cout, 1, act=False)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride > 1 or cin != cout:
            self.shortcut = nn.Sequential()
            self.shortcut.add_module("pool", nn.AvgPool2d(stride) if stride > 1 else nn.Identity())
            self.shortcut.add_module("conv", nn.Conv2d(cin, cout, 1, bias=False))
            self.shortcut.add_module("bn", nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.pool(self.conv2(self.conv1(x))))
        return self.act(out + self.shortcut(x))


class AttentionPool2d(nn.Module):
    """Attention pooling over a (B, C, H, W) map with the mean token as the only query.

    Args:
        grid: spatial size H (= W) of the input map.
        width: channels C.
        heads: attention heads.
        output_dim: width of the output projection.
    """

    def __init__(self, grid: int, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.pos_embed = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, output_dim)
        for lin in (self.q, self.k, self.v, self.out):
            nn.init.normal_(lin.weight, std=width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + HW, C)
        H, d = self.heads, C // self.heads
        q = self.q(x[:, :1]).view(B, 1, H, d).transpose(1, 2)  # (B, H, 1, d)
        k = self.k(x).view(B, -1, H, d).transpose(1, 2)  # (B, H, 1 + HW, d)
        v = self.v(x).view(B, -1, H, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, d)
        return self.out(out.transpose(1, 2).reshape(B, C))  # (B, output_dim)


@contextmanager
def _restore_batch_norm_buffers(module: nn.Module):
    """Undoes the BatchNorm statistics update of a checkpointed segment's recompute in backward."""
    saved = [
        (b, b.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in m.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _checkpoint_contexts(module: nn.Module):
    return lambda: (nullcontext(), _restore_batch_norm_buffers(module))


@IMAGE_TOWERS.register("clip_resnet", aliases=("modified_resnet",))
class ClipModifiedResNet(BaseTower):
    """CLIP's modified ResNet.

    Args:
        layers: bottleneck blocks per stage, e.g. (3, 4, 6, 3) for RN50.
        width: stem width w; stages have w, 2w, 4w, 8w planes and the feature map has 32w channels.
        output_dim: attention-pool output width (the embedding width in CLIP).
        image_size: input size in pixels; must be divisible by 32.
        heads: attention-pool heads (default 32w / 64).
        pool: "attn" (CLIP) or "avg" (global average, output_dim becomes 32w).
        channels_last: run the convolutions in channels-last memory format (same results; faster on
            oneDNN CPUs and on tensor-core GPUs).
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int] | list[int] = (3, 4, 6, 3),
        width: int = 64,
        output_dim: int = 1024,
        image_size: int = 224,
        heads: int | None = None,
        pool: str = "attn",
        mean: tuple[float, ...] = OPENAI_MEAN,
        std: tuple[float, ...] = OPENAI_STD,
        interpolation: str = "bicubic",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        if image_size % 32:
            raise ValueError(f"image_size must be divisible by 32, got {image_size}")
        if pool not in ("attn", "avg"):
            raise ValueError(f"pool must be 'attn' or 'avg', got {pool!r}")
        self.image_size = (image_size, image_size)
        self.data_config = DataConfig(self.image_size, tuple(mean), tuple(std), interpolation, "shortest")
        self.stem = nn.Sequential()
        self.stem.add_module("conv1", nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False))
        self.stem.add_module("bn1", nn.BatchNorm2d(width // 2))
        self.stem.add_module("act1", nn.ReLU(inplace=True))
        self.stem.add_module("conv2", _ConvBN(width // 2, width // 2, 3))
        self.stem.add_module("conv3", _ConvBN(width // 2, width, 3))
        self.stem.add_module("pool", nn.AvgPool2d(2))

        cin = width
        self.stages = nn.ModuleList()
        for i, depth in enumerate(layers):
            planes = width * 2**i
            blocks = [Bottleneck(cin, planes, stride=1 if i == 0 else 2)]
            cin = planes * Bottleneck.expansion
            blocks += [Bottleneck(cin, planes) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*blocks))
        self.feature_dim = cin  # 32 w
        self.pool_type = pool
        if pool == "attn":
            self.pool: nn.Module = AttentionPool2d(image_size // 32, cin, heads or cin // 64, output_dim)
            self.output_dim = output_dim
        else:
            self.pool = nn.Identity()
            self.output_dim = cin
        for stage in self.stages:  # zero-init the last BN of every block
            for block in stage:
                nn.init.zeros_(block.conv3.bn.weight)
        self.grad_checkpointing = False

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        return [[self.stem], *[[s] for s in self.stages], [self.pool]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, w, H/4, W/4) stem output."""
        if x.shape[-2:] != self.image_size:
            raise ValueError(
                f"{type(self).__name__} expects images of {self.image_size[0]}x{self.image_size[1]}, got "
                f"{tuple(x.shape[-2:])}: preprocess with the tower's data_config, or build the tower with "
                "a matching image_size"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x)

    def _head(self, x: torch.Tensor) -> TowerOutput:
        """(B, 32w, H, W) last stage output -> pooled vector and the map as tokens."""
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, 32w)
        pooled = self.pool(x) if self.pool_type == "attn" else tokens.mean(dim=1)  # (B, output_dim)
        return TowerOutput(pooled=pooled, tokens=tokens)

    def forward(self, x: torch.Tensor) -> TowerOutput:
        x = self._stem(x)
        for stage in self.stages:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False, context_fn=_checkpoint_contexts(stage))
            else:
                x = stage(x)  # (B, C, H, W)
        return self._head(x)

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int]
    ) -> tuple[TowerOutput, list[torch.Tensor]]:
        """The forward output plus each requested stage's output map as tokens (B, H_i * W_i, C_i).

        ``indices`` count the four stages (the stem is not one), negative from the last, and the
        intermediates come back in their order. No activation checkpointing.
        """
        take = resolve_layer_indices(indices, len(self.stages))
        wanted, kept = set(take), {}
        x = self._stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (B, C_i, H_i, W_i)
            if i in wanted:
                kept[i] = x.flatten(2).transpose(1, 2)  # (B, H_i * W_i, C_i)
        return self._head(x), [kept[i] for i in take]
