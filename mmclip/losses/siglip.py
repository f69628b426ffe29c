"""SigLIP: pairwise sigmoid loss, exact across processes with memory that does not grow with them.

Per rank (b local pairs): loss = -sum_{i local, j all} log sigmoid(z_ij (t x_i . y_j + b)) / b, with
z = +1 for matching pairs and -1 otherwise, summed over the local block and every remote text shard
(negatives only). The mean over ranks equals the single-process loss on the full batch.

Each (rows x columns) block goes through one fused autograd function that computes the loss and, in the
same pass, the gradients for its inputs: nothing of size rows x columns is kept for backward, and with
``chunk_size`` not even one full block is materialised at once. Together with the ring exchange, a rank
holds its b x D features, one remote shard and b x chunk logits: flat in the number of ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmclip.losses.base import ContrastiveLoss
from mmclip.losses.distributed import gather_with_grad, ring_shards, world
from mmclip.registry import LOSSES

__all__ = ["SigLipLoss", "siglip_block"]


class _SigLipBlock(torch.autograd.Function):
    """sum over a block of softplus(-z * (scale * x @ y.T + bias)); gradients computed in forward."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, pos_offset: int | None, chunk: int | None):  # type: ignore[override]
        needs = ctx.needs_input_grad[:4]
        rows = x.shape[0]
        step = rows if not chunk else chunk
        total = x.new_zeros(())
        gx = torch.zeros_like(x) if needs[0] else None
        gy = torch.zeros_like(y) if needs[1] else None
        g_scale = x.new_zeros(())
        g_bias = x.new_zeros(())
        for start in range(0, rows, step):
            xs = x[start : start + step]  # (n, D)
            sim = xs @ y.T  # (n, c)
            logits = scale * sim + bias
            z = -torch.ones_like(logits)
            if pos_offset is not None:  # positives on the diagonal shifted by pos_offset
                idx = torch.arange(xs.shape[0], device=x.device)
                z[idx, pos_offset + start + idx] = 1.0
            zl = z * logits
            total = total + F.softplus(-zl).sum()
            if any(needs):
                coef = -z * torch.sigmoid(-zl)  # d loss / d logits, (n, c)
                if gx is not None:
                    gx[start : start + step] = scale * (coef @ y)
                if gy is not None:
                    gy += scale * (coef.T @ xs)
                g_scale = g_scale + (coef * sim).sum()
                g_bias = g_bias + coef.sum()
        ctx.save_for_backward(
            gx if gx is not None else x.new_empty(0),
            gy if gy is not None else y.new_empty(0),
            g_scale,
            g_bias,
        )
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        gx, gy, g_scale, g_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return (
            grad * gx if needs[0] else None,
            grad * gy if needs[1] else None,
            grad * g_scale if needs[2] else None,
            grad * g_bias if needs[3] else None,
            None,
            None,
        )


def siglip_block(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    pos_offset: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Summed sigmoid loss of a block of pairs; (x_i, y_{pos_offset + i}) are positives, all else negatives.

    Args:
        x: (n, D) image features (rows).
        y: (c, D) text features (columns).
        scale: scalar multiplier of the similarities (exp of the log temperature).
        bias: scalar logit bias.
        pos_offset: column of row 0's positive, or None when the block holds negatives only.
        chunk_size: rows per chunk; None computes the block in one piece.
    """
    return _SigLipBlock.apply(x, y, scale, bias, pos_offset, chunk_size)


@LOSSES.register("siglip")
class SigLipLoss(ContrastiveLoss):
    """Pairwise sigmoid loss (SigLIP).

    Args:
        exchange: "ring" (default), "bidir_ring", "gather" or "local".
        chunk_size: rows per chunk of each logits block (None: whole block).
        max_logit_scale: SigLIP does not clamp its temperature by default (pretrained scales exceed 100).
        check_inputs: also check finiteness (costs a host-device sync; for debugging).
    """

    supported_exchanges = ("ring", "bidir_ring", "gather", "local")

    def __init__(
        self,
        exchange: str = "ring",
        chunk_size: int | None = None,
        max_logit_scale: float | None = None,
        check_inputs: bool = False,
    ) -> None:
        super().__init__(exchange, max_logit_scale, check_inputs)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
        self.chunk_size = chunk_size

    def compute(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias: build the model with init_logit_bias (e.g. -10)")
        x, y = self.validate(image_embeds, text_embeds, logit_scale, logit_bias)
        scale, bias = logit_scale.to(x.dtype), logit_bias.to(x.dtype)
        b = x.shape[0]
        rank, size = world()
        if self.exchange == "gather" and size > 1:
            total = siglip_block(
                x, gather_with_grad(y), scale, bias, pos_offset=rank * b, chunk_size=self.chunk_size
            )
        else:
            total = siglip_block(x, y, scale, bias, pos_offset=0, chunk_size=self.chunk_size)
            if self.exchange in ("ring", "bidir_ring"):
                for shard in ring_shards(y, bidirectional=self.exchange == "bidir_ring"):
                    total = total + siglip_block(
                        x, shard, scale, bias, pos_offset=None, chunk_size=self.chunk_size
                    )
        loss = total / b
        with torch.no_grad():
            pos = (scale * (x * y).sum(-1) + bias).mean()
        return {
            "loss": loss,
            "logit_scale": scale.detach(),
            "logit_bias": bias.detach(),
            "pos_logit_mean": pos,
        }

    @staticmethod
    def init_bias_for_batch(batch_size: int) -> float:
        """Bias that makes the initial positive rate 1 / batch_size: log(p / (1 - p)) with p = 1 / B."""
        p = 1.0 / batch_size
        return math.log(p / (1.0 - p))
