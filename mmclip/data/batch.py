"""The one batch type every mmclip data module yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageTextBatch:
    """A batch of images and their captions, as every data module yields it.

    Training batches hold one caption per image (``T == B``). Evaluation batches may hold several
    captions per image; ``caption_image_index`` then says which image (row of ``images``) each caption
    describes.

    Attributes:
        images: ``(B, 3, H, W)`` float, already normalised for the image tower.
        input_ids: ``(T, L)`` token ids, padded with the tokenizer's pad id.
        keys: ``B`` sample keys (unique per sample within a data set).
        caption_image_index: ``(T,)`` image row of each caption; ``None`` means ``arange(B)``.
        labels: ``(B,)`` class ids for classification data, ``-1`` where unknown; ``None`` if the data
            has no labels.
        captions: the ``T`` caption strings (for reports and debugging); ``None`` if not kept.
        skipped: samples the worker that built this batch skipped since its previous batch, by reason.
            Summed over batches this gives the run's skip counts (see ``mmclip.data.quality``).
    """

    images: torch.Tensor  # (B, 3, H, W)
    input_ids: torch.Tensor  # (T, L)
    keys: list[str]
    caption_image_index: torch.Tensor | None = None  # (T,)
    labels: torch.Tensor | None = None  # (B,)
    captions: list[str] | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)  # a tensor's or a NaFlexImages batch's first dimension

    @property
    def text_to_image(self) -> torch.Tensor:
        """``(T,)`` image row of each caption (``arange(B)`` for one caption per image)."""
        if self.caption_image_index is not None:
            return self.caption_image_index
        return torch.arange(len(self.images), device=self.images.device)

    def to(self, device: torch.device | str) -> ImageTextBatch:
        """Move the tensors to ``device`` (a new batch; lists are shared)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return ImageTextBatch(
            images=move(self.images),
            input_ids=move(self.input_ids),
            keys=self.keys,
            caption_image_index=move(self.caption_image_index),
            labels=move(self.labels),
            captions=self.captions,
            skipped=self.skipped,
        )

    def pin_memory(self) -> ImageTextBatch:
        """Pinned copy, used by ``DataLoader(pin_memory=True)``."""
        return ImageTextBatch(
            images=self.images.pin_memory(),
            input_ids=self.input_ids.pin_memory(),
            keys=self.keys,
            caption_image_index=None
            if self.caption_image_index is None
            else self.caption_image_index.pin_memory(),
            labels=None if self.labels is None else self.labels.pin_memory(),
            captions=self.captions,
            skipped=self.skipped,
        )
