"""CLIP: symmetric softmax InfoNCE on normalised features, exact across processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmclip.losses.base import ContrastiveLoss
from mmclip.losses.distributed import gather_with_grad, world
from mmclip.registry import LOSSES

__all__ = ["ClipLoss"]


@LOSSES.register("clip")
class ClipLoss(ContrastiveLoss):
    """(CE(s I T^T, y) + CE(s T I^T, y)) / 2 with y the matching pairs.

    Across processes features are all-gathered with gradient. With ``local_loss`` each rank scores only its
    own rows against all columns (memory O(b x B) per rank instead of O(B x B)), labels offset by rank.

    Args:
        exchange: "gather" (default) or "local" (each rank uses its own batch only: fewer negatives).
        local_loss: with "gather", compute only this rank's rows.
        label_smoothing: cross-entropy label smoothing.
        max_logit_scale: temperature policy, clamp exp(logit_scale) to at most this (100, as in CLIP).
        check_inputs: also check finiteness (costs a host-device sync; for debugging).
    """

    supported_exchanges = ("gather", "local")

    def __init__(
        self,
        exchange: str = "gather",
        local_loss: bool = False,
        label_smoothing: float = 0.0,
        max_logit_scale: float | None = 100.0,
        check_inputs: bool = False,
    ) -> None:
        super().__init__(exchange, max_logit_scale, check_inputs)
        self.local_loss = local_loss
        self.label_smoothing = label_smoothing

    def _compute(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        sizes: list[int],
    ) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        rank, size = world()
        norm = 1.0 / max(b, 1)  # mean over the rows this rank scores
        if self.exchange == "gather" and size > 1:
            all_x, all_y = gather_with_grad(x, sizes), gather_with_grad(y, sizes)  # (B, D)
            if self.local_loss:
                logits_i2t = scale * x @ all_y.T  # (b, B)
                logits_t2i = scale * y @ all_x.T  # (b, B)
                labels = torch.arange(b, device=x.device) + sum(sizes[:rank])
                norm = self.share(sizes)  # this rank's rows' share of the full-batch mean
            else:
                logits_i2t = scale * all_x @ all_y.T  # (B, B)
                logits_t2i = logits_i2t.T
                labels = torch.arange(all_x.shape[0], device=x.device)
                norm = 1.0 / all_x.shape[0]
        else:
            logits_i2t = scale * x @ y.T  # (b, b)
            logits_t2i = logits_i2t.T
            labels = torch.arange(b, device=x.device)
        if logit_bias is not None:
            logits_i2t, logits_t2i = logits_i2t + logit_bias, logits_t2i + logit_bias
        smoothing = self.label_smoothing
        loss_i2t = F.cross_entropy(logits_i2t, labels, label_smoothing=smoothing, reduction="sum") * norm
        loss_t2i = F.cross_entropy(logits_t2i, labels, label_smoothing=smoothing, reduction="sum") * norm
        with torch.no_grad():  # logging terms on the local block, O(b D)
            pos = scale * (x * y).sum(-1)  # (b,)
            neg_sum = scale * (x.sum(0) @ y.sum(0)) - pos.sum()
            neg = neg_sum / max(b * b - b, 1)
        return {
            "loss": (loss_i2t + loss_t2i) / 2,
            "loss_i2t": loss_i2t.detach(),
            "loss_t2i": loss_t2i.detach(),
            "logit_scale": scale.detach(),
            "pos_logit_mean": pos.sum() / max(b, 1),
            "neg_logit_mean": neg,
        }
