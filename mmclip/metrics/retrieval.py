"""Image-text retrieval recall@k, computed in chunks, as a distributed-safe torchmetrics ``Metric``.

Two definitions, both reported (``RetrievalMetric.compute`` / :func:`retrieval_metrics`):

* **Any positive** (CLIP_benchmark; COCO / Flickr30k with 5 captions per image): a text->image query
  succeeds at k if its image is in the top k; an image->text query succeeds at k if *any* of its
  captions is in the top k. Keys ``i2t_R@k``, ``t2i_R@k``, ``i2t_mean_rank``, ``i2t_median_rank``, ...
* **Paired 1:1** (OpenCLIP's ``get_clip_metrics``): every image is paired with its *first* caption
  (the smallest caption id) and the ``N x N`` problem of those pairs is ranked. Keys ``paired_i2t_R@k``,
  ``paired_i2t_mean_rank``, ``paired_i2t_median_rank``, ``paired_t2i_...``. With one caption per image
  the two definitions coincide.

Rank and ties. A query's rank is the number of *negatives* (candidates that are not one of its
positives) whose similarity is strictly greater than the query's best positive score; it succeeds at
k when ``rank < k``. Ties with the positive therefore count in the query's favour (they never push the
positive down), whatever the order of the data. Mean rank is ``mean(rank) + 1`` and median rank
``floor(median(rank)) + 1`` (1-based, as OpenCLIP reports them; the median of an even count is the mean
of the two middle values, as in numpy).

Similarity is the dot product of the embeddings as given (pass L2-normalised embeddings for cosine
similarity). The positive score of an (image, caption) pair is their dot product, computed once and
shared by both directions; negatives come from a chunked matrix product. Results are exact whenever
the similarities are exactly representable (e.g. integer-valued embeddings in float32); otherwise a
negative within rounding (~1e-7 relative) of the positive may fall either way, as in any implementation.

Memory: only ``chunk_size`` rows of the image x caption similarity matrix exist at a time, so COCO-sized
problems (25k images x 125k captions, 12.5 GB as a full fp32 matrix) need ``chunk_size * T`` floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "RetrievalMetric",
    "RetrievalRanks",
    "retrieval_metrics",
    "retrieval_ranks",
    "summarize_ranks",
    "unique_first_index",
]

DEFAULT_KS = (1, 5, 10)
DEFAULT_CHUNK_SIZE = 1024


@dataclass
class RetrievalRanks:
    """0-based ranks of every query (the number of negatives scoring strictly above its best positive).

    Attributes:
        image_to_text: ``(N',)`` one per image that has at least one caption, in image order.
        text_to_image: ``(T,)`` one per caption.
    """

    image_to_text: torch.Tensor
    text_to_image: torch.Tensor


def _positive_scores(
    images: torch.Tensor, texts: torch.Tensor, text_image_index: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``(T,)`` dot product of each caption with its own image, in chunks of captions."""
    rows = max(1, chunk_size * 8)
    out = torch.empty(texts.shape[0], dtype=texts.dtype, device=texts.device)
    for start in range(0, texts.shape[0], rows):
        stop = min(start + rows, texts.shape[0])
        out[start:stop] = (texts[start:stop] * images[text_image_index[start:stop]]).sum(-1)
    return out


# Counting True entries of a bool matrix. torch's bool -> integer reductions run ~5x slower than the
# comparison that makes the mask, so the counts are summed SWAR-style instead: a row of 8 * W bools is
# viewed as W int64 words (8 byte lanes each) and words are added as integers. Each lane then counts its
# own column, exactly, as long as no lane exceeds 255 (no carry into the neighbouring lane): column sums
# add at most 255 rows at a time, row sums at most 255 words before the lanes are unpacked.
_LANES = 8
_MAX_LANE = 255
_PAD = _LANES * _MAX_LANE  # the similarity block's width is padded to a multiple of this


def _count_columns(mask: torch.Tensor) -> torch.Tensor:
    """``(R, P)`` bool (``P % 8 == 0``, contiguous) -> ``(P,)`` int64 number of True per column."""
    total = torch.zeros(mask.shape[1], dtype=torch.long, device=mask.device)
    for r in range(0, mask.shape[0], _MAX_LANE):
        words = mask[r : r + _MAX_LANE].view(torch.int64)  # (<=255, P / 8)
        total += words.sum(0).view(torch.uint8)  # (P,) each lane <= 255
    return total


def _count_rows(mask: torch.Tensor) -> torch.Tensor:
    """``(R, P)`` bool (``P % 2040 == 0``, contiguous) -> ``(R,)`` int64 number of True per row."""
    rows = mask.shape[0]
    words = mask.view(torch.int64).view(rows, -1, _MAX_LANE)  # (R, P / 2040, 255)
    lanes = words.sum(-1).view(torch.uint8)  # (R, P / 255) each lane <= 255
    return lanes.view(rows, -1).sum(1)


def _count_ranks(
    images: torch.Tensor,
    texts: torch.Tensor,
    text_image_index: torch.Tensor,
    chunk_size: int,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts, in one chunked pass over the image x caption matrix, the negatives above each positive.

    Args:
        images: ``(N, D)``.
        texts: ``(T, D)``.
        text_image_index: ``(T,)`` row of ``images`` each caption describes.
        chunk_size: image rows per chunk (the pass holds a ``(chunk_size, T)`` block).
        shard: ``(rank, world_size)``: process only chunks ``rank, rank + world_size, ...``; summing the
            outputs of every shard gives the full result.

    Returns:
        ``(N,)`` image->text counts (0 for images without captions; mask them out) and ``(T,)``
        text->image counts, both int64.
    """
    n, t = images.shape[0], texts.shape[0]
    positive = _positive_scores(images, texts, text_image_index, chunk_size)  # (T,)
    # best positive score of each image (-inf for images without captions)
    best = torch.full((n,), -math.inf, dtype=positive.dtype, device=positive.device)
    best = best.scatter_reduce(0, text_image_index, positive, reduce="amax")  # (N,)
    # captions sorted by image, so each image's captions are one contiguous run
    order = torch.argsort(text_image_index, stable=True)
    counts_per_image = torch.bincount(text_image_index, minlength=n)
    starts = torch.cumsum(counts_per_image, 0) - counts_per_image  # (N,)
    i2t = torch.zeros(n, dtype=torch.long, device=images.device)
    t2i = torch.zeros(t, dtype=torch.long, device=images.device)
    # the similarity block, padded to a width the counters need; padding columns stay -inf (never counted)
    width = -(-t // _PAD) * _PAD
    block = torch.full((min(chunk_size, n), width), -math.inf, dtype=texts.dtype, device=texts.device)
    threshold = torch.full((width,), math.inf, dtype=positive.dtype, device=positive.device)
    threshold[:t] = positive
    rank, world_size = shard
    for chunk, start in enumerate(range(0, n, chunk_size)):
        if chunk % world_size != rank:
            continue
        stop = min(start + chunk_size, n)
        sims = block[: stop - start]  # (c, P)
        torch.matmul(images[start:stop], texts.T, out=sims[:, :t])  # (c, T), written in place
        # mask the positives of these images (their captions are one run of `order`)
        lo = int(starts[start])
        hi = int(starts[stop - 1] + counts_per_image[stop - 1])
        pos_cols = order[lo:hi]  # (P,)
        pos_rows = text_image_index[pos_cols] - start  # (P,)
        sims[pos_rows, pos_cols] = -math.inf
        i2t[start:stop] = _count_rows(sims > best[start:stop, None])  # (c,)
        t2i += _count_columns(sims > threshold[None, :])[:t]  # (T,)
    return i2t, t2i


def _check_inputs(images: torch.Tensor, texts: torch.Tensor, text_image_index: torch.Tensor) -> None:
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"expected image embeddings (N, D) and text embeddings (T, D), got {tuple(images.shape)} "
            f"and {tuple(texts.shape)}"
        )
    if images.shape[0] == 0 or texts.shape[0] == 0:
        raise ValueError(
            f"retrieval needs at least one image and one caption, got {images.shape[0]} images and "
            f"{texts.shape[0]} captions"
        )
    if text_image_index.shape != (texts.shape[0],):
        raise ValueError(
            f"text_image_index must be (T,) = ({texts.shape[0]},), got {tuple(text_image_index.shape)}"
        )
    if int(text_image_index.min()) < 0 or int(text_image_index.max()) >= images.shape[0]:
        raise ValueError(f"text_image_index must lie in [0, {images.shape[0]}) (one row of the images)")


def _first_captions(text_image_index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images that have a caption, index of each one's first caption), in image order."""
    t = text_image_index.shape[0]
    first = torch.full((n,), t, dtype=torch.long, device=text_image_index.device)
    first = first.scatter_reduce(
        0, text_image_index, torch.arange(t, device=text_image_index.device), reduce="amin"
    )
    has_text = first < t
    return has_text.nonzero().squeeze(1), first[has_text]


def retrieval_ranks(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_index: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    shard: tuple[int, int] = (0, 1),
    reduce: Callable[..., None] | None = None,
) -> RetrievalRanks:
    """Any-positive ranks of every image->text and text->image query (see the module docstring).

    Args:
        image_embeds: ``(N, D)``.
        text_embeds: ``(T, D)``.
        text_image_index: ``(T,)`` the row of ``image_embeds`` each caption describes.
        chunk_size: image rows of the similarity matrix held at a time.
        shard: ``(rank, world_size)``: compute only this process's share of the chunks.
        reduce: with ``shard``, called as ``reduce(i2t_counts, t2i_counts)`` to sum the partial int64
            counts of every shard in place (``RetrievalMetric`` passes an all-reduce).

    Returns:
        :class:`RetrievalRanks`; images without captions have no image->text rank.
    """
    _check_inputs(image_embeds, text_embeds, text_image_index)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    i2t, t2i = _count_ranks(image_embeds, text_embeds, text_image_index, chunk_size, shard)
    if reduce is not None:
        reduce(i2t, t2i)
    has_text = torch.bincount(text_image_index, minlength=image_embeds.shape[0]) > 0
    return RetrievalRanks(image_to_text=i2t[has_text], text_to_image=t2i)


def _median_rank(ranks: torch.Tensor) -> float:
    """``floor(median(ranks)) + 1`` with numpy's median (mean of the two middle values)."""
    s = torch.sort(ranks).values
    m = s.shape[0]
    median = float(s[m // 2]) if m % 2 else (float(s[m // 2 - 1]) + float(s[m // 2])) / 2
    return math.floor(median) + 1.0


def summarize_ranks(
    ranks: RetrievalRanks, ks: Sequence[int] = DEFAULT_KS, prefix: str = ""
) -> dict[str, float]:
    """R@k (``mean(rank < k)``), mean rank and median rank (1-based) for both directions."""
    out: dict[str, float] = {}
    for name, r in (("i2t", ranks.image_to_text), ("t2i", ranks.text_to_image)):
        for k in ks:
            out[f"{prefix}{name}_R@{k}"] = float((r < k).double().mean())
        out[f"{prefix}{name}_mean_rank"] = float(r.double().mean()) + 1.0
        out[f"{prefix}{name}_median_rank"] = _median_rank(r)
    return out


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_index: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    paired: bool = True,
    shard: tuple[int, int] = (0, 1),
    reduce: Callable[..., None] | None = None,
) -> dict[str, float]:
    """Any-positive recall@k / ranks, and (``paired``) the 1:1 first-caption metrics.

    Args:
        image_embeds: ``(N, D)``.
        text_embeds: ``(T, D)``.
        text_image_index: ``(T,)`` the row of ``image_embeds`` each caption describes; an image's first
            caption (for the paired metrics) is the first one in this order.
        ks: the k of recall@k.
        chunk_size: image rows of the similarity matrix held at a time.
        paired: also report OpenCLIP's 1:1 metrics (prefix ``paired_``).
        shard: see :func:`retrieval_ranks`.
        reduce: see :func:`retrieval_ranks`.

    Returns:
        ``{"i2t_R@1": ..., "t2i_R@1": ..., "i2t_mean_rank": ..., "paired_i2t_R@1": ..., ...}``.
    """
    text_image_index = text_image_index.to(device=image_embeds.device, dtype=torch.long)
    ranks = retrieval_ranks(image_embeds, text_embeds, text_image_index, chunk_size, shard, reduce)
    out = summarize_ranks(ranks, ks)
    if paired:
        rows, first = _first_captions(text_image_index, image_embeds.shape[0])
        pair_index = torch.arange(rows.shape[0], device=rows.device)
        pair_ranks = retrieval_ranks(
            image_embeds[rows], text_embeds[first], pair_index, chunk_size, shard, reduce
        )
        out |= summarize_ranks(pair_ranks, ks, prefix="paired_")
    return out


def _ordinals(ids: torch.Tensor) -> torch.Tensor:
    """Position of each element among the elements with the same id (in input order)."""
    n = ids.shape[0]
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    idx = torch.arange(n, device=ids.device)
    new_group = torch.ones(n, dtype=torch.bool, device=ids.device)
    new_group[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = torch.cummax(torch.where(new_group, idx, torch.zeros_like(idx)), 0).values
    out = torch.empty_like(idx)
    out[order] = idx - group_start
    return out


def unique_first_index(keys: torch.Tensor) -> torch.Tensor:
    """Index of the first occurrence of every distinct value (1-D) or row (2-D) of ``keys``, in key order."""
    n = keys.shape[0]
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=keys.device)
    return first.scatter_reduce(0, inverse, torch.arange(n, device=keys.device), reduce="amin")


def _is_identity(index: torch.Tensor, n: int) -> bool:
    return index.shape[0] == n and bool((index == torch.arange(n, device=index.device)).all())


class RetrievalMetric(Metric):
    """Recall@k for image<->text retrieval over a whole evaluation set, synced across processes.

    Each process calls :meth:`update` with its shard. Images carry global ids; captions carry the id of
    their image (and optionally their own id). After the cross-process gather, ``compute`` drops
    duplicated images and captions (e.g. the padding a ``DistributedSampler`` adds), orders everything
    by id, so the result does not depend on how the data was sharded, and splits the chunked similarity
    pass over the processes. See the module docstring for the definitions and the tie rule.

    Example::

        metric = RetrievalMetric()
        for batch in loader:
            metric.update(img_emb, img_ids, txt_emb, txt_img_ids)
        results = metric.compute()  # {"i2t_R@1": tensor(0.61), "t2i_R@5": ..., "paired_i2t_R@1": ...}

    Args:
        ks: the k of recall@k.
        chunk_size: image rows of the similarity matrix held at a time (memory ``chunk_size * T``).
        paired: also report OpenCLIP's paired 1:1 metrics (``paired_`` prefix).
        split_compute: when distributed, each process computes a share of the chunks (then one
            all-reduce of the counts); every process must call ``compute`` (as syncing needs anyway).
        **kwargs: passed to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        ks: Sequence[int] = DEFAULT_KS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        paired: bool = True,
        split_compute: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {ks}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.ks = tuple(int(k) for k in ks)
        self.chunk_size = chunk_size
        self.paired = paired
        self.split_compute = split_compute
        self.add_state("image_embeds", default=[], dist_reduce_fx="cat")  # flattened (N * D,)
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")  # (N,)
        self.add_state("text_embeds", default=[], dist_reduce_fx="cat")  # flattened (T * D,)
        self.add_state("text_image_ids", default=[], dist_reduce_fx="cat")  # (T,)
        self.add_state("text_ids", default=[], dist_reduce_fx="cat")  # (T,)

    def update(
        self,
        image_embeds: torch.Tensor,
        image_ids: torch.Tensor,
        text_embeds: torch.Tensor,
        text_image_ids: torch.Tensor,
        text_ids: torch.Tensor | None = None,
    ) -> None:
        """Adds a shard of images and captions (they need not come from the same images).

        Args:
            image_embeds: ``(B, D)``.
            image_ids: ``(B,)`` non-negative global image ids (the same image has the same id everywhere).
            text_embeds: ``(T, D)``.
            text_image_ids: ``(T,)`` global id of each caption's image.
            text_ids: ``(T,)`` caption ids, unique within an image. ``None``: a caption's position among
                the captions of the same image in this call (so pass ids when one image's captions are
                split across calls).
        """
        if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
            raise ValueError(
                f"expected (B, D) image and (T, D) text embeddings, got {tuple(image_embeds.shape)} "
                f"and {tuple(text_embeds.shape)}"
            )
        if image_ids.shape != (image_embeds.shape[0],) or text_image_ids.shape != (text_embeds.shape[0],):
            raise ValueError("image_ids must be (B,) and text_image_ids (T,), one per embedding row")
        image_ids = image_ids.to(device=self.device, dtype=torch.long)
        text_image_ids = text_image_ids.to(device=self.device, dtype=torch.long)
        if (image_ids < 0).any() or (text_image_ids < 0).any():
            raise ValueError("image ids must be non-negative")
        if text_ids is None:
            text_ids = _ordinals(text_image_ids)
        self.image_embeds.append(image_embeds.detach().to(self.device, self.dtype).reshape(-1))
        self.image_ids.append(image_ids)
        self.text_embeds.append(text_embeds.detach().to(self.device, self.dtype).reshape(-1))
        self.text_image_ids.append(text_image_ids)
        self.text_ids.append(text_ids.to(device=self.device, dtype=torch.long))

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Syncs like ``Metric.sync``; a process that saw no data contributes typed empty tensors."""
        empties = {
            "image_embeds": self.dtype,
            "text_embeds": self.dtype,
            "image_ids": torch.long,
            "text_image_ids": torch.long,
            "text_ids": torch.long,
        }
        for name, dtype in empties.items():
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                state.append(torch.zeros(0, dtype=dtype, device=self.device))
        super().sync(*args, **kwargs)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deduplicated (images (N, D), texts (T, D), text_image_index (T,)), ordered by id."""
        image_ids = dim_zero_cat(self.image_ids).long()
        text_image_ids = dim_zero_cat(self.text_image_ids).long()
        text_ids = dim_zero_cat(self.text_ids).long()
        if image_ids.numel() == 0 or text_image_ids.numel() == 0:
            raise ValueError("RetrievalMetric.compute called before any images and captions were added")
        dim = dim_zero_cat(self.image_embeds).numel() // image_ids.numel()
        images = dim_zero_cat(self.image_embeds).view(-1, dim)  # (N_all, D)
        texts = dim_zero_cat(self.text_embeds).view(-1, dim)  # (T_all, D)
        keep = unique_first_index(image_ids)  # sorted by id
        if not _is_identity(keep, images.shape[0]):  # (no copy when already unique and sorted)
            images, image_ids = images[keep], image_ids[keep]
        keep = unique_first_index(torch.stack([text_image_ids, text_ids], 1))  # sorted by (image id, text id)
        if not _is_identity(keep, texts.shape[0]):
            texts, text_image_ids = texts[keep], text_image_ids[keep]
        index = torch.searchsorted(image_ids, text_image_ids).clamp_max(image_ids.shape[0] - 1)
        missing = image_ids[index] != text_image_ids
        if missing.any():
            raise ValueError(
                f"{int(missing.sum())} captions refer to image ids that were never added, e.g. "
                f"{int(text_image_ids[missing][0])}"
            )
        return images, texts, index

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"i2t_R@1": ..., "t2i_R@1": ..., "i2t_mean_rank": ..., "paired_t2i_R@1": ..., ...}`` (scalars)."""
        images, texts, index = self._gathered()
        shard, reduce = (0, 1), None
        if self.split_compute and self.sync_on_compute and dist.is_available() and dist.is_initialized():
            group = self.process_group
            world_size = dist.get_world_size(group)
            if world_size > 1:
                shard = (dist.get_rank(group), world_size)

                def reduce(*counts: torch.Tensor) -> None:
                    for c in counts:
                        dist.all_reduce(c, group=group)

        with torch.autocast(images.device.type, enabled=False):  # similarities in the state's dtype
            out = retrieval_metrics(
                images, texts, index, self.ks, self.chunk_size, self.paired, shard, reduce
            )
        return {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in out.items()}
