"""From raw samples to ``ImageTextBatch``: decode, check, transform, pick captions, tokenize.

Every data source (shards, HF rows, CSV rows, synthetic scenes) produces :class:`RawSample`s; a
:class:`SampleProcessor` (run in the DataLoader workers) turns each into an image tensor and its captions
or skips it with a reason, and :func:`collate` stacks the processed samples and tokenizes their captions.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmclip.data.batch import ImageTextBatch
from mmclip.data.quality import DEFAULT_MAX_PIXELS, SkipCounter, SkipSample, decode_captions, decode_image
from mmclip.data.transforms import ImageTransform

__all__ = [
    "ProcessedSample",
    "RawSample",
    "SampleProcessor",
    "collate",
    "concat_batches",
    "empty_batch",
    "sample_rng",
    "sample_seed",
]


def sample_seed(*parts: int | str) -> int:
    """A 64-bit seed from ``parts`` (e.g. seed, epoch, sample index), the same in every process."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little")


def sample_rng(*parts: int | str) -> random.Random:
    """A ``random.Random`` seeded with :func:`sample_seed` of ``parts``."""
    return random.Random(sample_seed(*parts))


@dataclass
class RawSample:
    """One sample as a source stores it, before any decoding.

    Attributes:
        key: unique sample key within the data set.
        image: encoded bytes, a file path, a decoded ``PIL.Image``, or ``None`` if missing.
        captions: a caption (str or bytes), a list of them, or ``None`` if missing.
        label: class id, or ``None`` / ``-1`` if unknown.
        skip: a skip reason the source already knows (a malformed CSV row, a duplicate key); the sample
            holds a place in the source's order and is counted as skipped when it is processed.
    """

    key: str
    image: Any
    captions: Any
    label: int | None = None
    skip: str | None = None


@dataclass
class ProcessedSample:
    """A usable sample: its key, image (a ``(3, H, W)`` tensor, or a NaFlex tower's ``NaFlexSample``), captions
    (one in training) and label."""

    key: str
    image: Any
    captions: list[str]
    label: int | None


class SampleProcessor:
    """Turns a :class:`RawSample` into a :class:`ProcessedSample`, or counts it as skipped.

    Args:
        transform: the image transform (training transforms take the sample's ``rng``).
        train: keep one caption per image, chosen with the sample's ``rng``; otherwise keep all.
        max_pixels: decompression-bomb ceiling (see :func:`mmclip.data.quality.decode_image`).
        draft: decode JPEGs at a reduced size when the target is much smaller (faster, not pixel-exact
            with a full decode; fixed-size transforms only).

    Attributes:
        pad_to: the patch count training batches of NaFlex samples are padded to (the transform's
            ``max_num_patches``, so training shapes are fixed); ``None`` for fixed-size images and evaluation.
    """

    def __init__(
        self,
        transform: ImageTransform | Any,
        train: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft: bool = False,
    ):
        self.transform = transform
        self.train = train
        self.max_pixels = max_pixels
        self.draft = draft and isinstance(transform, ImageTransform)
        self.pad_to: int | None = getattr(transform, "max_num_patches", None) if train else None
        self.skips = SkipCounter()

    def __call__(
        self, raw: RawSample, rng: random.Random | None = None, max_num_patches: int | None = None
    ) -> ProcessedSample | None:
        """The processed sample, or ``None`` (counted in ``self.skips``) if it cannot be used.
        ``max_num_patches``: a NaFlex transform's patch budget for this sample (its batch's)."""
        try:
            if raw.skip is not None:
                raise SkipSample(raw.skip)
            captions = decode_captions(raw.captions)
            if self.train:
                captions = [
                    captions[0] if len(captions) == 1 else captions[_rng(rng).randrange(len(captions))]
                ]
            draft_size = None
            if self.draft:
                # decode at 1/2^k only while the smallest possible crop keeps >= 1 pixel per output pixel
                h, w = self.transform.size
                t = self.transform
                factor = 1.0 / math.sqrt(t.scale[0] * min(t.ratio[0], 1 / t.ratio[1])) if self.train else 1.0
                draft_size = (math.ceil(w * factor), math.ceil(h * factor))
            img = decode_image(raw.image, max_pixels=self.max_pixels, draft_size=draft_size)
            try:
                image = (
                    self.transform(img, rng) if max_num_patches is None else self.transform(img, rng, max_num_patches)
                )
            except Exception as err:
                raise SkipSample("decode_error", f"transform failed: {type(err).__name__}: {err}") from None
        except SkipSample as skip:
            self.skips.skip(skip.reason, raw.key, skip.detail)
            return None
        label = raw.label if raw.label is None else int(raw.label)
        return ProcessedSample(key=raw.key, image=image, captions=captions, label=label)


def _rng(rng: random.Random | None) -> random.Random:
    return rng if rng is not None else random.Random()


def collate(
    samples: list[ProcessedSample],
    tokenizer: Any,
    skipped: dict[str, int] | None = None,
    keep_captions: bool = True,
    with_labels: bool | None = None,
    pad_to: int | None = None,
) -> ImageTextBatch:
    """Stack processed samples into an ``ImageTextBatch`` and tokenize their captions.

    Args:
        samples: the batch's samples (at least one).
        tokenizer: callable ``list[str] -> LongTensor (T, L)``.
        skipped: skip counts to carry in the batch.
        keep_captions: keep the caption strings in ``batch.captions``.
        with_labels: attach ``labels`` (``-1`` where unknown); ``None`` attaches them if any sample has one.
        pad_to: NaFlex samples are padded to this many patches (``None``: to the longest).
    """
    if isinstance(samples[0].image, torch.Tensor):
        # numpy copies on one thread: torch.stack's intra-op threads stall on a busy machine (main-process loading)
        images: Any = torch.from_numpy(np.stack([s.image.numpy() for s in samples]))  # (B, 3, H, W)
    else:
        from mmclip.data.naflex import collate_images

        images = collate_images([s.image for s in samples], pad_to=pad_to)  # NaFlexImages
    captions = [c for s in samples for c in s.captions]
    counts = [len(s.captions) for s in samples]
    caption_image_index = None
    if any(n != 1 for n in counts):
        caption_image_index = torch.repeat_interleave(
            torch.arange(len(samples)), torch.tensor(counts)
        )  # (T,)
    input_ids = tokenizer(captions)  # (T, L)
    if with_labels is None:
        with_labels = any(s.label is not None and s.label >= 0 for s in samples)
    labels = None
    if with_labels:
        labels = torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.long)  # (B,)
    return ImageTextBatch(
        images=images,
        input_ids=input_ids,
        keys=[s.key for s in samples],
        caption_image_index=caption_image_index,
        labels=labels,
        captions=captions if keep_captions else None,
        skipped=dict(skipped or {}),
    )


def empty_batch(
    images: Any,
    context_length: int,
    skipped: dict[str, int] | None = None,
    keep_captions: bool = True,
    with_labels: bool | None = None,
) -> ImageTextBatch:
    """A batch of zero samples that carries skip counts (every sample it stood for was unusable).

    ``images``: the zero images, as the transform's ``empty_images()`` gives them, or a ``(H, W)`` size."""
    if isinstance(images, (tuple, list, torch.Size)):
        images = torch.zeros(0, 3, *images)  # (0, 3, H, W)
    return ImageTextBatch(
        images=images,
        input_ids=torch.zeros(0, context_length, dtype=torch.long),  # (0, L)
        keys=[],
        labels=torch.zeros(0, dtype=torch.long) if with_labels else None,
        captions=[] if keep_captions else None,
        skipped=dict(skipped or {}),
    )


def concat_batches(parts: list[ImageTextBatch], skipped: dict[str, int] | None = None) -> ImageTextBatch:
    """One training batch (one caption per image) from consecutive pieces, in order, with ``skipped``."""
    if len(parts) == 1 and parts[0].caption_image_index is None:
        only = parts[0]
        return ImageTextBatch(
            images=only.images,
            input_ids=only.input_ids,
            keys=list(only.keys),
            labels=only.labels,
            captions=None if only.captions is None else list(only.captions),
            skipped=dict(skipped or {}),
        )
    if any(p.caption_image_index is not None for p in parts):
        raise ValueError("concat_batches joins training batches (one caption per image)")
    labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])  # (B,)
    captions = None if any(p.captions is None for p in parts) else [c for p in parts for c in p.captions]
    if isinstance(parts[0].images, torch.Tensor):
        images: Any = torch.cat([p.images for p in parts])  # (B, 3, H, W)
    else:
        images = type(parts[0].images).cat([p.images for p in parts])  # NaFlexImages
    return ImageTextBatch(
        images=images,
        input_ids=torch.cat([p.input_ids for p in parts]),  # (B, L)
        keys=[k for p in parts for k in p.keys],
        labels=labels,
        captions=captions,
        skipped=dict(skipped or {}),
    )


def slice_batch(batch: ImageTextBatch, start: int, end: int) -> ImageTextBatch:
    """Rows ``[start, end)`` of a training batch (views, no copy)."""
    return ImageTextBatch(
        images=batch.images[start:end],  # (b, 3, H, W)
        input_ids=batch.input_ids[start:end],  # (b, L)
        keys=batch.keys[start:end],
        labels=None if batch.labels is None else batch.labels[start:end],
        captions=None if batch.captions is None else batch.captions[start:end],
    )
