"""Typed outputs passed between towers, the dual encoder, losses and tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TowerOutput", "DualEncoderOutput", "CaptionOutput"]


@dataclass
class TowerOutput:
    """What every tower returns.

    Attributes:
        pooled: (B, D) one vector per sample, before the dual encoder's projection.
        tokens: (B, N, D') per-token features (patch tokens, text tokens) or None.
        mask: (B, N) bool, True where a token is real (text padding is False), or None when all are.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class DualEncoderOutput:
    """The dual encoder's output, read by losses and metrics by field name.

    Attributes:
        image_embeds: (B, E) L2-normalized image embeddings.
        text_embeds: (B, E) L2-normalized text embeddings.
        logit_scale: scalar tensor, the exponentiated temperature (multiply similarities by it).
        logit_bias: scalar tensor or None (SigLIP).
        image_output: the image tower's raw output, when kept.
        text_output: the text tower's raw output, when kept.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    image_output: TowerOutput | None = None
    text_output: TowerOutput | None = None


@dataclass
class CaptionOutput:
    """Output of a captioning model.

    Attributes:
        loss: scalar language-model loss, or None when no labels were given.
        logits: (B, L, V) next-token logits.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
