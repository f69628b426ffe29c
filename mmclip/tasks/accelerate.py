"""The fast road on GPUs, kept out of the tasks' logic: ``torch.compile`` options, the CUDA defaults (TF32
matmuls for fp32 parts, channels-last convolutional towers) and caption padding under compile."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["COMPILE_MODES", "compile_options", "cuda_defaults", "pad_text_for_compile"]

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(compile: bool | str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments from a task's ``compile`` setting, or None for eager.

    Args:
        compile: False / None (eager), True (the default mode), a mode name (``COMPILE_MODES``) or a dict of
            ``torch.compile`` arguments (``mode``, ``backend``, ``dynamic``, ``fullgraph``, ``options``).

    Raises:
        ValueError: an unknown mode.
    """
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    options = {"mode": compile} if isinstance(compile, str) else dict(compile)
    mode = options.get("mode")
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; known: {list(COMPILE_MODES)} (or true / false)")
    return options


def pad_text_for_compile(ids: torch.Tensor, tower: nn.Module, multiple: int | None) -> torch.Tensor:
    """Caption ids for a compiled text tower: a length that does not recompile with every batch.

    Eager towers trim each batch to its longest caption themselves; under compile they keep the length they
    are given. ``multiple=None`` keeps the tokenizer's full length (one shape: no recompile, the most padding);
    an integer trims to the longest caption rounded up to that multiple (one host read per batch; after the
    second length dynamo compiles one graph for every length, so at most one recompile). Only towers whose
    output does not depend on the padding (``tower.trim``: causal, pooled at end-of-text) are trimmed.
    """
    if multiple is None or not getattr(tower, "trim", False) or ids.shape[0] == 0:
        return ids
    if multiple < 1:
        raise ValueError(f"text_pad_multiple must be >= 1, got {multiple}")
    longest = int(tower.pool_index(ids).max()) + 1
    length = min(ids.shape[1], -(-longest // multiple) * multiple)
    return ids[:, :length]


def cuda_defaults(model: nn.Module) -> list[str]:
    """Turns on what is free speed on CUDA GPUs and returns what it turned on (for the log): TF32 tensor
    cores for the fp32 matmuls and convolutions left outside autocast, and channels-last input for towers
    that run convolutions beyond their patch stem (``channels_last`` attribute)."""
    done = []
    if torch.get_float32_matmul_precision() == "highest":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        done.append("TF32 matmuls")
    for name, module in model.named_modules():
        if hasattr(module, "channels_last") and not module.channels_last:
            convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
            if convs > 1:  # a ViT's patch embedding alone gains nothing
                module.channels_last = True
                module.to(memory_format=torch.channels_last)  # the kernels too, not only the input
                done.append(f"channels-last {name or type(module).__name__}")
    return done
