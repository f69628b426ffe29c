"""Plain O(B^2) references written directly from the formulas in REFERENCE.md (float64, no shortcuts)."""

from __future__ import annotations

import torch


def clip_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """(CE(s X Y^T, arange) + CE(s Y X^T, arange)) / 2, cross-entropy spelled out with logsumexp."""
    logits = scale * x @ y.T
    if bias is not None:
        logits = logits + bias
    n = logits.shape[0]

    def ce(lg: torch.Tensor) -> torch.Tensor:
        logp = lg - torch.logsumexp(lg, dim=1, keepdim=True)  # log softmax per row
        nll = -logp[torch.arange(n), torch.arange(n)]
        smooth = -logp.mean(dim=1)
        return ((1 - label_smoothing) * nll + label_smoothing * smooth).mean()

    return (ce(logits) + ce(logits.T)) / 2


def siglip_reference(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """-sum_ij log sigmoid(z_ij (s x_i . y_j + b)) / B with z = 2 I - 1."""
    n = x.shape[0]
    z = 2 * torch.eye(n, dtype=x.dtype) - 1
    logits = scale * x @ y.T + bias
    return -torch.log(torch.sigmoid(z * logits)).sum() / n
