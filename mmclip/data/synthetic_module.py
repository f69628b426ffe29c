"""``SyntheticDataModule``: the synthetic shapes data (:mod:`mmclip.data.synthetic`) rendered on the fly."""

from __future__ import annotations

from typing import Any

from mmclip.data.base import ImageTextDataModule
from mmclip.data.synthetic import CLASSNAMES, HELD_OUT_CLASSES, TEMPLATES, SyntheticShapes, _pairs
from mmclip.towers.base import DataConfig

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(ImageTextDataModule):
    """The synthetic shapes data, rendered on the fly (map-style, no files).

    Args:
        n_train, n_val, n_test: scenes per split (0 for none).
        n_classification: single-shape images per classification split (default ``n_test``).
        image_size: rendered side; the default ``data_config`` uses it too (OpenAI mean/std, bicubic).
        data_seed: seed of the scenes (``seed`` drives shuffling and augmentation).
        captions_per_image: captions per scene.
        classification_classes: classes in ``classification_dataloader``: "all", "seen" or "held_out"
            (labels always index :data:`CLASSNAMES`).
        **kwargs: :class:`ImageTextDataModule` options (``data_config``, ``tokenizer``, ``batch_size``, ...).
    """

    def __init__(
        self,
        n_train: int = 20000,
        n_val: int = 1000,
        n_test: int = 1000,
        n_classification: int | None = None,
        image_size: int = 64,
        data_seed: int = 0,
        captions_per_image: int = 5,
        classification_classes: str = "all",
        **kwargs: Any,
    ):
        kwargs.setdefault("classnames", CLASSNAMES)
        kwargs.setdefault("templates", TEMPLATES)
        super().__init__(**kwargs)
        _pairs(classification_classes)  # validate
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.n_classification = n_test if n_classification is None else n_classification
        self.image_size = image_size
        self.data_seed = data_seed
        self.captions_per_image = captions_per_image
        self.classification_classes = classification_classes
        self.held_out_classes = list(HELD_OUT_CLASSES)
        self.default_data_config = DataConfig(image_size=(image_size, image_size))

    def _source(self, split: str) -> SyntheticShapes | None:
        n = self.sizes.get(split, 0)
        if not n:
            return None
        return SyntheticShapes(split, n, self.image_size, self.data_seed, self.captions_per_image)

    def _classification_source(self, split: str) -> SyntheticShapes | None:
        if not self.n_classification:
            return None
        classes = (
            "seen"
            if split == "train" and self.classification_classes == "all"
            else self.classification_classes
        )
        return SyntheticShapes(
            split,
            self.n_classification,
            self.image_size,
            self.data_seed,
            self.captions_per_image,
            "classification",
            classes,
        )

    def _has_labels(self, split: str) -> bool:
        return bool(self.n_classification)
