"""The tower contract shared by every image and text tower.

A tower is an ``nn.Module`` with:

- ``output_dim``: width of ``TowerOutput.pooled``;
- ``forward(x) -> TowerOutput(pooled (B, D), tokens (B, N, D') | None, mask (B, N) | None)``;
- ``lock(unlocked_groups=0, freeze_norm=False)``: freeze all but the last ``unlocked_groups`` layer groups
  (LiT); with ``freeze_norm`` the BatchNorm statistics of the frozen groups stop updating too;
- ``set_grad_checkpointing(enable=True)``;
- image towers also have ``data_config``, so preprocessing follows the tower;
- optionally ``forward_intermediates(x, indices) -> (TowerOutput, list of (B, N, D) per index)``: the
  outputs of the requested blocks (stages for convnets) in one pass, indices resolved with
  ``resolve_layer_indices`` (negative counts from the end). The frozen ``Featurizer`` reads it.

``BaseTower`` implements ``lock`` from an ordered list of layer groups that each tower declares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mmclip.layers.norm import freeze_batch_norm
from mmclip.outputs import TowerOutput

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "DataConfig", "Tower", "BaseTower", "resolve_layer_indices"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for an image tower.

    Attributes:
        image_size: (height, width) in pixels.
        mean: per-channel mean for normalisation.
        std: per-channel std for normalisation.
        interpolation: resize filter ("bicubic", "bilinear").
        resize_mode: "shortest" (resize shorter side, centre crop) or "squash" (resize to the exact size).
    """

    image_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    extra: dict = field(default_factory=dict, compare=False)


def resolve_layer_indices(indices: Sequence[int], num_layers: int) -> list[int]:
    """Block indices as non-negative positions, in the given order (negative ones count from the end).

    Raises:
        IndexError: an index outside ``[-num_layers, num_layers)``.
    """
    resolved = []
    for i in indices:
        j = num_layers + i if i < 0 else i
        if not 0 <= j < num_layers:
            raise IndexError(f"layer index {i} is out of range for {num_layers} layers")
        resolved.append(j)
    return resolved


@runtime_checkable
class Tower(Protocol):
    """What a dual encoder needs from a tower (see the module docstring)."""

    output_dim: int

    def forward(self, x: torch.Tensor) -> TowerOutput: ...

    def lock(self, unlocked_groups: int = 0, freeze_norm: bool = False) -> None: ...

    def set_grad_checkpointing(self, enable: bool = True) -> None: ...


class BaseTower(nn.Module):
    """Base class giving towers ``lock`` from their ordered layer groups."""

    output_dim: int

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """Layer groups from input to output; ``lock`` leaves the last ones trainable."""
        raise NotImplementedError

    def lock(self, unlocked_groups: int = 0, freeze_norm: bool = False) -> None:
        """Freezes every parameter except those of the last ``unlocked_groups`` layer groups.

        Args:
            unlocked_groups: how many groups, counted from the output end, stay trainable.
            freeze_norm: also freeze BatchNorm statistics (and affine values) in the frozen groups.
        """
        groups = self.layer_groups()
        if not 0 <= unlocked_groups <= len(groups):
            raise ValueError(f"unlocked_groups must be in [0, {len(groups)}] for {type(self).__name__}")
        frozen = groups[: len(groups) - unlocked_groups]
        for group in frozen:
            for item in group:
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for p in params:
                    p.requires_grad_(False)
        if freeze_norm:
            frozen_modules = {id(m) for g in frozen for m in g if isinstance(m, nn.Module)}
            for name, child in list(self.named_modules()):
                if id(child) in frozen_modules:
                    parent_name, _, attr = name.rpartition(".")
                    parent = self.get_submodule(parent_name) if parent_name else self
                    setattr(parent, attr, self._freeze_norm(child))

    def _freeze_norm(self, module: nn.Module) -> nn.Module:
        """Returns ``module`` with its BatchNorm layers frozen (towers with special norms override)."""
        return freeze_batch_norm(module)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes block activations in backward instead of storing them."""
        raise NotImplementedError
