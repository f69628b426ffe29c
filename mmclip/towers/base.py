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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mmclip.layers.norm import freeze_batch_norm
from mmclip.outputs import TowerOutput

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "DataConfig",
    "Tower",
    "BaseTower",
    "check_images",
    "check_token_ids",
    "resolve_layer_indices",
]

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


def fixed_size_data_config(data_config: DataConfig | None) -> DataConfig | None:
    """``data_config`` without a NaFlex tower's ``extra["naflex"]``: square ``image_size`` images as plain tensors,
    which NaFlex towers take as full patch grids. For the roads that stack image tensors (frozen featurizers,
    captioning prefixes, the vision-language bridge)."""
    if data_config is None or "naflex" not in data_config.extra:
        return data_config
    extra = {k: v for k, v in data_config.extra.items() if k != "naflex"}
    return dataclasses.replace(data_config, extra=extra)


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


def check_images(images: torch.Tensor, tower: nn.Module, channels: int = 3) -> None:
    """Raises on image batches a tower cannot take, naming the fix: not 4-d, channels-last (B, H, W, C) and
    integer pixels (uint8). Shape and dtype only: no host-device sync; skipped while compiling.

    Args:
        images: the batch given to the tower.
        tower: the image tower (its name and ``data_config`` go into the message).
        channels: the channels the tower takes.
    """
    if torch.compiler.is_compiling():
        return
    name = type(tower).__name__
    if images.ndim != 4:
        hint = ": add the batch dimension with images.unsqueeze(0)" if images.ndim == 3 else ""
        raise ValueError(f"{name} takes (B, {channels}, H, W) image batches, got shape {tuple(images.shape)}{hint}")
    if images.shape[1] != channels and images.shape[-1] == channels:
        B, H, W, C = images.shape
        raise ValueError(
            f"{name} takes channels-first images (B, {channels}, H, W), got {tuple(images.shape)}, which looks "
            f"channels-last (B, H, W, C): permute it with images.permute(0, 3, 1, 2) to ({B}, {C}, {H}, {W})"
        )
    if not images.is_floating_point():
        dc = getattr(tower, "data_config", None)
        norm = f" (mean={tuple(dc.mean)}, std={tuple(dc.std)})" if dc is not None else ""
        raise TypeError(
            f"{name} takes float images normalised as its data_config says{norm}, got {images.dtype} pixels: "
            "convert and normalise them, e.g. (images.float() / 255 - mean) / std, or preprocess with the "
            "model's transforms (mmclip.create_model_and_transforms / mmclip.data.image_transform)"
        )


def check_token_ids(ids: torch.Tensor, vocab_size: int, tower: nn.Module, bounds: tuple[int, int]) -> None:
    """Raises when token ids fall outside ``[0, vocab_size)``, which an embedding lookup answers with an
    index error on CPU and a device-side assert (a dead process) on GPU.

    Args:
        ids: (B, L) token ids.
        vocab_size: the tower's vocabulary size.
        tower: the text tower (its name goes into the message).
        bounds: the ids' (min, max), read by the caller (which decides when a host sync is affordable).
    """
    low, high = bounds
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{type(tower).__name__} has a vocabulary of {vocab_size} tokens (ids 0..{vocab_size - 1}), got ids "
            f"from {low} to {high}: the tokenizer does not match the model (tokenize with the model's own "
            "tokenizer, mmclip.get_tokenizer(model source), or build the tower with its vocab_size); negative "
            "ids are never valid (padding is the tokenizer's pad id)"
        )


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
