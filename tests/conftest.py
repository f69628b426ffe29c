"""Shared test helpers: random weights that exercise every parameter and buffer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fills every float parameter and BatchNorm statistic with seeded random values.

    Default inits leave some tensors at 0 or 1 (biases, norms, zero-init BN gains), where a swapped or
    transposed key would go unnoticed; random values make every tensor count in a parity test.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(2.0)
            elif name.endswith("logit_bias"):
                p.fill_(-1.0)
            else:
                p.copy_(
                    torch.randn(p.shape, generator=g) * (std if p.ndim > 1 else 0.5)
                    + (
                        1.0
                        if p.ndim == 1
                        and ("norm" in name or "ln" in name or "bn" in name)
                        and name.endswith("weight")
                        else 0.0
                    )
                )
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return module


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
