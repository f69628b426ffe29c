"""Contrastive-correct gradient accumulation by feature caching and re-forward.

Plain gradient accumulation changes a contrastive loss: each micro-batch only sees its own negatives.
Here the whole logical batch is embedded once without gradient, the loss and its gradients with respect
to the (cached) embeddings are computed on the full batch, then each micro-batch is embedded again with
gradient and back-propagated with its slice of the cached embedding gradients. The parameter gradients
equal those of one full-batch step; activation memory is that of one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from mmclip.outputs import DualEncoderOutput

__all__ = ["cached_feature_step"]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_feature_step(
    model: torch.nn.Module,
    loss_fn: Callable[[DualEncoderOutput], dict[str, torch.Tensor]],
    images: torch.Tensor,
    texts: torch.Tensor,
    micro_batch_size: int,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """Back-propagates the full-batch contrastive loss through ``model`` one micro-batch at a time.

    Gradients are accumulated into the parameters' ``.grad`` (call ``optimizer.step()`` afterwards).
    Random state is replayed for each micro-batch so dropout and patch dropout see the same masks in
    both passes. BatchNorm statistics are updated by both passes.

    Args:
        model: a ``DualEncoder`` (``encode_image``, ``encode_text``, ``logit_scale``, ``logit_bias``).
        loss_fn: a contrastive loss taking a ``DualEncoderOutput``.
        images: (B, 3, H, W) the whole logical batch.
        texts: (B, L) token ids.
        micro_batch_size: samples per re-forward; need not divide B.
        no_sync: under DDP, ``ddp_model.no_sync`` so only the last micro-batch all-reduces gradients.

    Returns:
        The loss dict, detached.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {texts.shape[0]} texts: pair them one to one")
    inner = getattr(model, "module", model)  # DDP-wrapped or plain
    device = images.device
    starts = range(0, images.shape[0], micro_batch_size)
    states, image_cache, text_cache = [], [], []
    with torch.no_grad():
        for s in starts:
            states.append(_rng_state(device))
            image_cache.append(inner.encode_image(images[s : s + micro_batch_size], normalize=True))
            text_cache.append(inner.encode_text(texts[s : s + micro_batch_size], normalize=True))
    image_embeds = torch.cat(image_cache).requires_grad_(True)  # (B, E)
    text_embeds = torch.cat(text_cache).requires_grad_(True)  # (B, E)
    out = DualEncoderOutput(image_embeds, text_embeds, inner.logit_scale.exp(), inner.logit_bias)
    losses = loss_fn(out)
    losses["loss"].backward()  # -> embedding grads, and logit_scale / logit_bias grads directly
    after = _rng_state(device)
    for i, s in enumerate(starts):
        _set_rng_state(states[i], device)
        last = i == len(starts) - 1
        ctx = no_sync() if (no_sync is not None and not last) else nullcontext()
        with ctx:
            e_i = inner.encode_image(images[s : s + micro_batch_size], normalize=True)
            e_t = inner.encode_text(texts[s : s + micro_batch_size], normalize=True)
            torch.autograd.backward(
                [e_i, e_t],
                [image_embeds.grad[s : s + micro_batch_size], text_embeds.grad[s : s + micro_batch_size]],
            )
    _set_rng_state(after, device)
    return {k: v.detach() for k, v in losses.items()}
