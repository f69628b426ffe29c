"""Normalisation layers: LayerNorm computed in fp32, and BatchNorm with frozen statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm", "FrozenBatchNorm2d", "freeze_batch_norm"]


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always normalises in fp32 and returns the input's dtype.

    Under bf16/fp16 (autocast or low-precision weights) the statistics stay in fp32, as the
    reference CLIP implementations do.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            # fp32/fp64 run as they are; autocast lists layer_norm as an fp32 op, so fp32 stays fp32 under it
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (same state-dict keys as BatchNorm2d)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Returns ``module`` with every plain BatchNorm2d / SyncBatchNorm inside replaced by a FrozenBatchNorm2d.

    Statistics and affine values are copied, so outputs in eval mode are unchanged, and the statistics no
    longer move when the model is put back in train mode. Subclasses that do more than normalise (timm's
    BatchNormAct2d, for instance) are left alone: their owners freeze them with their own tools.
    """
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        ref = module.running_mean if module.running_mean is not None else module.weight
        frozen = FrozenBatchNorm2d(module.num_features, module.eps).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module
