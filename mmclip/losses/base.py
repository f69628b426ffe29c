"""What every contrastive loss shares: input checks, the exchange choice and the temperature policy."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmclip.losses.distributed import EXCHANGES, batch_sizes, world
from mmclip.outputs import DualEncoderOutput

__all__ = ["ContrastiveLoss", "EmptyBatchError", "clamp_logit_scale_"]


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def clamp_logit_scale_(logit_scale: torch.Tensor, max_scale: float = 100.0) -> None:
    """Clamps a log-temperature parameter in place to [0, log(max_scale)] (call after the optimizer step)."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, math.log(max_scale))


class EmptyBatchError(ValueError):
    """No image-text pair in the step on any process (every rank raises it together); a training task skips
    the step."""


class ContrastiveLoss(nn.Module):
    """Base class: ``loss(output)`` reads a ``DualEncoderOutput`` by field name and returns a dict with ``loss``.

    Subclasses implement ``compute(image_embeds, text_embeds, logit_scale, logit_bias)`` and declare the
    exchanges they support. A loss reads ``torch.distributed`` state when called, never in ``__init__``.

    Args:
        exchange: how negatives are shared across processes (see ``mmclip.losses.distributed``).
        max_logit_scale: temperature policy: the largest ``exp(logit_scale)`` allowed, or None.
        check_inputs: also check that features and scales are finite (host-device syncs: debugging only).

    A loss that exchanges features across processes first all-gathers every rank's batch size (one integer
    each), so ranks may bring different sizes (the short batches at the end of an exactly-once epoch, an empty
    one included) and the loss stays the full-batch loss: each rank's share is weighted by its rows. A step
    with no pair on any process raises :class:`EmptyBatchError` on every rank.
    """

    supported_exchanges: tuple[str, ...] = ()
    #: model parameters this loss needs and their initial values when a model lacks them, e.g.
    #: ``{"logit_bias": -10.0, "logit_scale": math.log(10)}``; the task adds them (``prepare_model``).
    model_requirements: dict[str, float] = {}

    def __init__(self, exchange: str, max_logit_scale: float | None, check_inputs: bool = False) -> None:
        super().__init__()
        if exchange not in self.supported_exchanges:
            known = [e for e in EXCHANGES if e in self.supported_exchanges]
            raise ValueError(
                f"{type(self).__name__} does not support exchange {exchange!r}; supported: {known}"
            )
        self.exchange = exchange
        self.max_logit_scale = max_logit_scale
        self.check_inputs = check_inputs

    def prepare_model(self, model: nn.Module) -> list[str]:
        """Gives ``model`` (a ``DualEncoder``) the parameters this loss needs that it lacks, initialised as
        :attr:`model_requirements` says. Returns the names of the parameters added (empty when none)."""
        needs = self.model_requirements
        if "logit_bias" not in needs or getattr(model, "logit_bias", None) is not None:
            return []
        model.add_logit_bias(needs["logit_bias"], needs.get("logit_scale"))
        return ["logit_bias"] + (["logit_scale"] if "logit_scale" in needs else [])

    def forward(self, output: DualEncoderOutput) -> dict[str, torch.Tensor]:
        return self.compute(output.image_embeds, output.text_embeds, output.logit_scale, output.logit_bias)

    def compute(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss terms from raw tensors: (B, E) normalised features, scalar scale (and bias)."""
        x, y = self.validate(image_embeds, text_embeds, logit_scale, logit_bias)
        sizes = self.rank_sizes(x.shape[0], x.device)
        bias = None if logit_bias is None else logit_bias.to(x.dtype)
        # the loss runs in fp32 (or wider) even inside an autocast region of the training step
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._compute(x, y, logit_scale.to(x.dtype), bias, sizes)

    def rank_sizes(self, n: int, device: torch.device) -> list[int]:
        """Every rank's batch size (one tiny all-gather when features are exchanged, else ``[n]``).

        Raises:
            EmptyBatchError: no pair on any rank (raised on every rank together).
        """
        sizes = batch_sizes(n, device) if self.exchange != "local" and world()[1] > 1 else [n]
        if sum(sizes) == 0:
            raise EmptyBatchError(
                f"{type(self).__name__} got an empty batch on every process: a contrastive loss needs at "
                "least one image-text pair per step (check the data loader and the skips that emptied it)"
            )
        return sizes

    @staticmethod
    def share(sizes: list[int]) -> float:
        """``W / B``: the factor that turns this rank's summed loss into its share of the full-batch mean,
        so that the average over ranks (DDP's gradient average) is the full-batch loss whatever each brings."""
        return len(sizes) / sum(sizes)

    def _compute(
        self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def clamp_(self, logit_scale: torch.Tensor) -> None:
        """Applies this loss's temperature policy to the model's ``logit_scale`` parameter (after a step)."""
        if self.max_logit_scale is not None:
            clamp_logit_scale_(logit_scale, self.max_logit_scale)

    def validate(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape checks (free) and, with ``check_inputs``, finiteness checks; returns fp32 features."""
        if image_embeds.ndim != 2 or text_embeds.ndim != 2:
            raise ValueError(
                f"features must be (batch, dim); got image {tuple(image_embeds.shape)} and text "
                f"{tuple(text_embeds.shape)}"
            )
        if image_embeds.shape != text_embeds.shape:
            raise ValueError(
                f"image and text features must pair up one to one; got image {tuple(image_embeds.shape)} and "
                f"text {tuple(text_embeds.shape)}: give each image exactly one caption per step"
            )
        if logit_scale.numel() != 1 or (logit_bias is not None and logit_bias.numel() != 1):
            raise ValueError("logit_scale and logit_bias must be scalars")
        if image_embeds.shape[0] == 0 and world()[1] == 1:
            raise EmptyBatchError(
                f"{type(self).__name__} got an empty batch (0 pairs): a contrastive loss needs at least one "
                "image-text pair per step (check the data loader and the skips that emptied the batch)"
            )
        if self.check_inputs:
            for name, t in (
                ("image_embeds", image_embeds),
                ("text_embeds", text_embeds),
                ("logit_scale", logit_scale),
                ("logit_bias", logit_bias),
            ):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise FloatingPointError(
                        f"{name} has non-finite values (NaN or inf): check the learning rate, "
                        "mixed precision and the inputs of this step"
                    )
        # the loss is computed in fp32 (or wider) whatever the towers ran in
        return _at_least_fp32(image_embeds), _at_least_fp32(text_embeds)
