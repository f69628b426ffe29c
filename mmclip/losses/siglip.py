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
from mmclip.losses.distributed import gather_with_grad, ring_pass, ring_shards, world
from mmclip.registry import LOSSES

__all__ = ["SigLipLoss", "siglip_block"]


def _block_terms(x, y, scale, bias, pos_offset: int | None, chunk: int | None, grads: bool):
    """Summed loss of one block and, when ``grads``, its gradients for x, y, scale and bias."""
    rows = x.shape[0]
    step = max(rows if not chunk else chunk, 1)  # (an empty block of rows: no chunk to compute)
    acc = torch.float64  # scalar sums in fp64: the loss stays exact to ~1e-7 even over millions of pairs
    total = x.new_zeros((), dtype=acc)
    gx = torch.zeros_like(x) if grads else None
    gy = torch.zeros_like(y) if grads else None
    g_scale, g_bias = x.new_zeros((), dtype=acc), x.new_zeros((), dtype=acc)
    for start in range(0, rows, step):
        xs = x[start : start + step]  # (n, D)
        sim = xs @ y.T  # (n, c)
        logits = torch.addcmul(bias, sim, scale)  # (n, c)
        total = total + F.softplus(logits).sum(
            dtype=acc
        )  # every pair as a negative: -log sigmoid(-l) = softplus(l)
        if pos_offset is not None:  # positives: -log sigmoid(l) = softplus(l) - l
            idx = torch.arange(xs.shape[0], device=x.device)
            pos = (idx, pos_offset + start + idx)
            total = total - logits[pos].sum(dtype=acc)
        if grads:
            coef = logits.sigmoid_()  # d loss / d logits: sigmoid(l), minus 1 on positives; in place
            if pos_offset is not None:
                coef[pos] -= 1.0
            gx[start : start + step] = scale * (coef @ y)
            gy += scale * (coef.T @ xs)
            g_scale = g_scale + torch.dot(coef.flatten(), sim.flatten()).to(acc)
            g_bias = g_bias + coef.sum(dtype=acc)
    return total, gx, gy, g_scale, g_bias  # scalars in fp64; callers cast once at the end


def _wants_grad(*tensors: torch.Tensor) -> bool:
    """Whether the caller will back-propagate (decided outside Function.forward, where grad mode is off)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _EagerGrad(torch.autograd.Function):
    """Base: forward computes the loss and its input gradients; backward only scales them."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        gx, gy, g_scale, g_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = [g if need else None for g, need in zip((gx, gy, g_scale, g_bias), needs[:4], strict=True)]
        return (*[None if g is None else grad * g for g in grads], *([None] * (len(needs) - 4)))


def _save(ctx, x, y, scale, bias, gx, gy, g_scale, g_bias) -> None:
    ctx.save_for_backward(
        gx if gx is not None else x.new_empty(0),
        gy if gy is not None else y.new_empty(0),
        g_scale.to(x.dtype).reshape(scale.shape),  # () or (1,): FSDP runs lift 0-d parameters
        g_bias.to(x.dtype).reshape(bias.shape),
    )


class _SigLipBlock(_EagerGrad):
    """One block of pairs; nothing of size rows x columns is kept for backward."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, pos_offset: int | None, chunk: int | None, grads: bool):  # type: ignore[override]
        total, gx, gy, g_scale, g_bias = _block_terms(x, y, scale, bias, pos_offset, chunk, grads)
        _save(ctx, x, y, scale, bias, gx, gy, g_scale, g_bias)
        return total.to(x.dtype)


class _SigLipRing(_EagerGrad):
    """The local block plus every remote text shard, passed around a ring in W - 1 steps.

    Each shard travels with an accumulator of the gradient the visited ranks' losses send to it; after the
    last step one more hop hands every accumulator to the shard's owner. Nothing is kept per step, so a
    rank's memory is its features, one shard with its accumulator, and one block (or chunk) of logits.
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, chunk: int | None, grads: bool):  # type: ignore[override]
        total, gx, gy, g_scale, g_bias = _block_terms(x, y, scale, bias, 0, chunk, grads)
        shard, acc = y, (torch.zeros_like(y) if grads else None)
        for _ in range(world()[1] - 1):
            if grads:
                shard, acc = ring_pass([shard, acc])
            else:
                (shard,) = ring_pass([shard])
            t, gx_s, gy_s, gs_s, gb_s = _block_terms(x, shard, scale, bias, None, chunk, grads)
            total = total + t
            if grads:
                gx, acc = gx + gx_s, acc + gy_s
                g_scale, g_bias = g_scale + gs_s, g_bias + gb_s
        if grads:
            (home,) = ring_pass([acc])  # the left neighbour holds the accumulator of this rank's shard
            gy = gy + home
        _save(ctx, x, y, scale, bias, gx, gy, g_scale, g_bias)
        return total.to(x.dtype)


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
    return _SigLipBlock.apply(x, y, scale, bias, pos_offset, chunk_size, _wants_grad(x, y, scale, bias))


@LOSSES.register("siglip")
class SigLipLoss(ContrastiveLoss):
    """Pairwise sigmoid loss (SigLIP).

    Exchanges: "ring" passes text shards around in W - 1 steps with memory flat in W (no per-step state);
    "bidir_ring" sends both ways in half the steps but keeps each received shard (b x D) for backward;
    "gather" all-gathers the text features; "local" uses only this rank's batch.

    Args:
        exchange: "ring" (default), "bidir_ring", "gather" or "local".
        chunk_size: rows per chunk of each logits block (None: whole block).
        max_logit_scale: SigLIP does not clamp its temperature by default (pretrained scales exceed 100).
        check_inputs: also check finiteness (costs a host-device sync; for debugging).
    """

    supported_exchanges = ("ring", "bidir_ring", "gather", "local")
    # the SigLIP paper's initialisation for a model without a bias: t' = log 10, b = -10
    model_requirements = {"logit_bias": -10.0, "logit_scale": math.log(10.0)}

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

    def _compute(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        sizes: list[int],
    ) -> dict[str, torch.Tensor]:
        if bias is None:
            raise ValueError(
                "SigLipLoss needs a logit_bias: build the model with init_logit_bias (e.g. -10), or let the "
                "task add it (loss.prepare_model(model))"
            )
        b = x.shape[0]
        rank, size = world()
        norm = 1.0 / max(b, 1)
        exchange = self.exchange
        if size > 1 and exchange != "local" and len(set(sizes)) > 1:
            exchange = "gather"  # ranks bring different sizes (an epoch's last batches): gather this step
        if exchange == "gather" and size > 1:
            total = siglip_block(
                x, gather_with_grad(y, sizes), scale, bias, pos_offset=sum(sizes[:rank]), chunk_size=self.chunk_size
            )
            norm = self.share(sizes)
        elif exchange == "ring" and size > 1:
            total = _SigLipRing.apply(x, y, scale, bias, self.chunk_size, _wants_grad(x, y, scale, bias))
        else:
            total = siglip_block(x, y, scale, bias, pos_offset=0, chunk_size=self.chunk_size)
            if exchange == "bidir_ring":
                for shard in ring_shards(y, bidirectional=True):
                    total = total + siglip_block(
                        x, shard, scale, bias, pos_offset=None, chunk_size=self.chunk_size
                    )
        loss = total * norm
        with torch.no_grad():
            pos = (scale * (x * y).sum(-1) + bias).sum() / max(b, 1)
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
