"""Optimizer and learning-rate schedule from plain specs: decay by rule, per-tower learning rates."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["build_optimizer", "build_scheduler", "param_groups", "warmup_cosine"]

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
_SCHEDULES = ("cosine", "constant", "linear")


def _tower_of(name: str) -> str:
    # image_encoder.: a PrefixCaptioner's image side (tower and projection)
    if name.startswith(("image_tower.", "image_proj.", "image_encoder.")):
        return "image"
    if name.startswith(("text_tower.", "text_proj.")):
        return "text"
    return "other"


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    image_lr: float | None = None,
    text_lr: float | None = None,
    lr_scale: dict[str, float] | None = None,
) -> list[dict]:
    """Trainable parameters in groups by tower and by the decay rule.

    Parameters with ``ndim >= 2`` (weight matrices, convolution kernels, embedding tables) decay; gains,
    biases, class tokens and the scalar ``logit_scale`` / ``logit_bias`` do not. Frozen parameters are left
    out. ``image_lr`` / ``text_lr`` (default ``lr``) apply to each tower and its projection (``image_lr`` also
    to a ``PrefixCaptioner``'s ``image_encoder``). ``lr_scale`` multiplies the learning rate of the parameters
    whose name contains a key (the first key that matches), in groups of their own.
    """
    lrs = {"image": image_lr or lr, "text": text_lr or lr, "other": lr}
    scales = dict(lr_scale or {})
    groups: dict[tuple[str, bool, str], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scaled = next((k for k in scales if k in name), "")
        groups.setdefault((_tower_of(name), p.ndim >= 2, scaled), []).append(p)
    return [
        {
            "params": params,
            "lr": lrs[tower] * scales.get(scaled, 1.0),
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{tower}/{'decay' if decay else 'no_decay'}" + (f"/{scaled}" if scaled else ""),
        }
        for (tower, decay, scaled), params in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 5e-4,
    weight_decay: float = 0.2,
    betas: Iterable[float] = (0.9, 0.98),
    eps: float = 1e-6,
    image_lr: float | None = None,
    text_lr: float | None = None,
    lr_scale: dict[str, float] | None = None,
    fused: bool | None = None,
    **kwargs: float,
) -> torch.optim.Optimizer:
    """The optimizer over ``param_groups(model, ...)``; defaults are the CLIP paper's ViT settings.

    Args:
        lr_scale: learning-rate multipliers by parameter-name substring (see :func:`param_groups`).
        fused: Adam / AdamW's fused kernel (one launch for every parameter). None: on when every trainable
            parameter is on a CUDA device, off elsewhere (the foreach kernel).

    Raises:
        ValueError: unknown optimizer name, or no trainable parameter.
    """
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(_OPTIMIZERS)}")
    groups = param_groups(model, lr, weight_decay, image_lr, text_lr, lr_scale)
    if not groups:
        raise ValueError("the model has no trainable parameter: both towers locked, projections included?")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **kwargs)
    if fused is None:
        fused = all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"])
    return _OPTIMIZERS[name](groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None, **kwargs)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, shape: str) -> float:
    """The learning-rate multiplier at ``step``: linear warmup from ~0 to 1, then ``shape`` to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if shape == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    name: str | None = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A per-step schedule: linear warmup over ``warmup_steps``, then cosine / linear decay or constant.

    Args:
        total_steps: optimizer steps of the whole run (Lightning's ``estimated_stepping_batches``).
        name: ``"cosine"``, ``"linear"``, ``"constant"``, or None for no scheduler.
        min_lr_ratio: the final learning rate as a fraction of the peak.
    """
    if name is None:
        return None
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {list(_SCHEDULES)}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio, name)
    )
