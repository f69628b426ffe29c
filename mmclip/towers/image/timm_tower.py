"""Any ``timm`` model as an image tower (ConvNeXt, EfficientNet, timm ViTs, ...).

The trunk is built with its classifier removed; ``pooled`` is the trunk's pre-logits feature (its own
global pool and head norm) and ``tokens`` the final feature map as a sequence. Projections live in the
dual encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmclip.outputs import TowerOutput
from mmclip.registry import IMAGE_TOWERS
from mmclip.towers.base import OPENAI_MEAN, OPENAI_STD, BaseTower, DataConfig, resolve_layer_indices

__all__ = ["TimmTower"]


@IMAGE_TOWERS.register("timm")
class TimmTower(BaseTower):
    """Wraps ``timm.create_model(model_name, num_classes=0, ...)``.

    Args:
        model_name: any name from ``timm.list_models()``.
        pretrained: load timm's pretrained weights (downloads; off by default).
        pool: global pool type ("avg", "max", "token", "map", ...); None keeps the model's default.
        image_size: input size; passed to timm as ``img_size`` for models that take it (ViTs), and used
            for ``data_config``. Default: the model's pretrained input size.
        drop_path: stochastic depth rate.
        mean, std: normalisation; default OpenAI's CLIP statistics, or timm's with ``timm_norm=True``.
        timm_norm: take mean/std from the model's pretrained config (use with ``pretrained=True``).
        interpolation, resize_mode: preprocessing, exposed as ``data_config`` ("shortest" side resize and
            centre crop, or "squash" to the square size).
        model_kwargs: further keyword arguments for ``timm.create_model``.
        num_classes: 0 (default): ``pooled`` is the trunk's pre-logits feature. N > 0: the trunk keeps its own
            classifier head with N outputs, and ``pooled`` is its output (OpenCLIP's timm towers without a
            projection of their own, e.g. EVA and MobileCLIP, project this way).
        channels_last: feed the trunk channels-last images (the same results up to float rounding; convnets
            run faster on oneDNN CPUs and tensor-core GPUs: 1.6x for the demo's ResNet on 2 CPU cores).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        pool: str | None = None,
        image_size: int | None = None,
        drop_path: float | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        timm_norm: bool = False,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        model_kwargs: dict[str, Any] | None = None,
        channels_last: bool = False,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        import timm

        self.channels_last = channels_last

        if not timm.is_model(model_name):
            import difflib

            close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
            raise KeyError(f"unknown timm model {model_name!r}; closest: {close}. See timm.list_models().")
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if pool is not None:
            kwargs["global_pool"] = pool
        if drop_path is not None:
            kwargs["drop_path_rate"] = drop_path
        self.model_name = model_name
        self.num_classes = num_classes
        try:  # transformers-style models take the input size (their position grid depends on it)
            sized = {"img_size": image_size} if image_size is not None and "img_size" not in kwargs else {}
            self.trunk = timm.create_model(
                model_name, pretrained=pretrained, num_classes=num_classes, **sized, **kwargs
            )
        except TypeError:  # convnets take any size
            self.trunk = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        self.output_dim = int(num_classes or self.trunk.num_features)
        cfg = self.trunk.pretrained_cfg or {}
        size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        if timm_norm:
            mean, std = cfg.get("mean", mean), cfg.get("std", std)
        self.data_config = DataConfig(
            (size, size), tuple(mean or OPENAI_MEAN), tuple(std or OPENAI_STD), interpolation, resize_mode
        )

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        from timm.models import group_modules, group_parameters

        matcher = self.trunk.group_matcher(coarse=True)
        params = group_parameters(self.trunk, matcher)
        modules = group_modules(self.trunk, matcher)
        groups: list[list[nn.Module | nn.Parameter]] = []
        for gid in sorted(set(params) | set(modules)):
            group: list[nn.Module | nn.Parameter] = [self.trunk.get_parameter(n) for n in params.get(gid, [])]
            group += [self.trunk.get_submodule(n) for n in modules.get(gid, [])]
            groups.append(group)
        return groups

    def _freeze_norm(self, module: nn.Module) -> nn.Module:
        from timm.layers import freeze_batch_norm_2d

        return freeze_batch_norm_2d(module)  # also handles BatchNormAct2d (norm + activation)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def _head(self, features: torch.Tensor) -> TowerOutput:
        """Trunk features (B, C, H, W) or (B, N, D) -> pre-logits pooled vector and tokens."""
        pooled = self.trunk.forward_head(features, pre_logits=not self.num_classes)  # (B, C)
        if features.ndim == 4:
            nhwc = getattr(self.trunk, "output_fmt", "NCHW") == "NHWC"  # e.g. Swin
            tokens = features.flatten(1, 2) if nhwc else features.flatten(2).transpose(1, 2)  # (B, HW, C)
        else:
            tokens = features[:, getattr(self.trunk, "num_prefix_tokens", 0) :]  # (B, N, C) patch tokens only
        return TowerOutput(pooled=pooled, tokens=tokens)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> TowerOutput:
        return self._head(self.trunk.forward_features(self._input(x)))

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int]
    ) -> tuple[TowerOutput, list[torch.Tensor]]:
        """The forward output plus intermediate features as tokens (B, H_i * W_i, C_i).

        Computed by timm's ``forward_intermediates``. ``indices`` count the trunk's ``feature_info``
        entries (stages for convnets, blocks for ViTs; negative from the end), and the intermediates come
        back in their order. ViT intermediates are patch tokens only.
        """
        if not hasattr(self.trunk, "forward_intermediates"):
            raise TypeError(f"timm model {self.model_name!r} has no forward_intermediates (update timm)")
        take = resolve_layer_indices(indices, len(self.trunk.feature_info))
        unique = sorted(set(take))
        features, maps = self.trunk.forward_intermediates(self._input(x), indices=unique, output_fmt="NCHW")
        kept = {i: m.flatten(2).transpose(1, 2) for i, m in zip(unique, maps, strict=True)}  # (B, HW, C)
        return self._head(features), [kept[i] for i in take]
