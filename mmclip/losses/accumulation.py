"""Contrastive-correct gradient accumulation by feature caching and re-forward.

Plain gradient accumulation changes a contrastive loss: each micro-batch only sees its own negatives.
Here the whole logical batch is embedded once without gradient, the loss and its gradients with respect
to the (cached) embeddings are computed on the full batch, then each micro-batch is embedded again with
gradient and back-propagated with its slice of the cached embedding gradients. The parameter gradients
equal those of one full-batch step; activation memory is that of one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmclip.losses.distributed import average_over_processes
from mmclip.outputs import DualEncoderOutput

__all__ = ["cached_feature_step"]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _batch_norm_buffers(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (buf, buf.clone())
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers()
    ]


def cached_feature_step(
    model: torch.nn.Module,
    loss_fn: Callable[[DualEncoderOutput], dict[str, torch.Tensor]],
    images: torch.Tensor,
    texts: torch.Tensor,
    micro_batch_size: int,
) -> dict[str, torch.Tensor]:
    """Back-propagates the full-batch contrastive loss through ``model`` one micro-batch at a time.

    Gradients are accumulated into the parameters' ``.grad`` (call ``optimizer.step()`` afterwards).
    Random state is replayed for each micro-batch so dropout and patch dropout see the same masks in
    both passes; BatchNorm statistics are restored after the cached pass, so they move once per sample.
    (BatchNorm in train mode normalises with per-micro-batch statistics, so for models with it the
    gradient is that of the micro-batched forward, not of one full-batch forward.)

    Under several processes pass the plain model or its DDP wrapper: the towers are run directly (the
    wrapper's hooks would fire once per micro-batch), and at the end every gradient is averaged over the
    processes, as DDP does; the loss exchanges features across processes as usual.

    Args:
        model: a ``DualEncoder`` (``encode_image``, ``encode_text``, ``logit_scale``, ``logit_bias``),
            possibly wrapped in DistributedDataParallel.
        loss_fn: a contrastive loss taking a ``DualEncoderOutput``.
        images: (B, 3, H, W) this process's share of the logical batch.
        texts: (B, L) token ids.
        micro_batch_size: samples per re-forward; need not divide B.

    Returns:
        The loss dict, detached.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {texts.shape[0]} texts: pair them one to one")
    inner = getattr(model, "module", model)  # DDP-wrapped or plain
    device = next(inner.parameters()).device  # the random state that matters is the model's device's
    starts = range(0, images.shape[0], micro_batch_size)
    states, image_cache, text_cache = [], [], []
    batch_norm = _batch_norm_buffers(inner)
    with torch.no_grad():
        for s in starts:
            states.append(_rng_state(device))
            image_cache.append(inner.encode_image(images[s : s + micro_batch_size], normalize=True))
            text_cache.append(inner.encode_text(texts[s : s + micro_batch_size], normalize=True))
        for buf, saved in batch_norm:
            buf.copy_(saved)
    image_embeds = torch.cat(image_cache).requires_grad_(True)  # (B, E)
    text_embeds = torch.cat(text_cache).requires_grad_(True)  # (B, E)
    out = DualEncoderOutput(image_embeds, text_embeds, inner.logit_scale.exp(), inner.logit_bias)
    losses = loss_fn(out)
    losses["loss"].backward()  # -> embedding grads, and logit_scale / logit_bias grads directly
    after = _rng_state(device)
    for i, s in enumerate(starts):
        _set_rng_state(states[i], device)
        e_i = inner.encode_image(images[s : s + micro_batch_size], normalize=True)
        e_t = inner.encode_text(texts[s : s + micro_batch_size], normalize=True)
        torch.autograd.backward(
            [e_i, e_t],
            [image_embeds.grad[s : s + micro_batch_size], text_embeds.grad[s : s + micro_batch_size]],
        )
    _set_rng_state(after, device)
    average_over_processes([p.grad for p in inner.parameters() if p.grad is not None])
    return {k: v.detach() for k, v in losses.items()}
