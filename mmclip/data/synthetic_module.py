"""``SyntheticDataModule``: the synthetic shapes data (:mod:`mmclip.data.synthetic`) rendered on the fly."""

from __future__ import annotations

from typing import Any

from mmclip.data.base import ImageTextDataModule
from mmclip.data.collate import RawSample
from mmclip.data.loader import MapLoader, ResumableLoader
from mmclip.data.synthetic import (
    ASPECTS,
    CLASSNAMES,
    COUNT_CLASSNAMES,
    HELD_OUT_CLASSES,
    SCENE_LABELS,
    TEMPLATES,
    Scene,
    SyntheticShapes,
    _pairs,
)
from mmclip.towers.base import DataConfig

__all__ = ["SyntheticDataModule"]

_TRAIN_SHAPES = ("scenes", "single", "mix")


class _Interleaved:
    """Two map-style sources alternating sample by sample: even indices from ``a``, odd ones from ``b``."""

    def __init__(self, a: SyntheticShapes, b: SyntheticShapes, n: int) -> None:
        self.a, self.b, self.n = a, b, n

    def __len__(self) -> int:
        return self.n

    def _pick(self, index: int) -> tuple[SyntheticShapes, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        return (self.a if index % 2 == 0 else self.b), index // 2

    def scene(self, index: int) -> Scene:
        source, i = self._pick(index)
        return source.scene(i)

    def get(self, index: int) -> RawSample:
        source, i = self._pick(index)
        return source.get(i)


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
        train_shapes: what the training split shows: "scenes" (1-3 shapes per image), "single" (one shape
            per image, the seen classes in turn, as the classification images) or "mix" (the two
            alternating, half each). Evaluation splits are unchanged.
        scene_label: "none" (default: contrastive data, single-shape classification images) or "count":
            the data module becomes a counting data set. Training batches then carry ``labels`` = number
            of shapes - 1 (class ids into :data:`COUNT_CLASSNAMES`, which become ``classnames``), and
            ``classification_dataloader(split)`` yields the first ``n_classification`` scenes of ``split``
            with those labels instead of single-shape images; there are no held-out classes.
        shape_only_captions: probability that a training caption names the shapes without their colours
            (in-batch negatives then differ by shape, which makes a contrastive model learn shape and not
            only colour and place); evaluation captions always name both.
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
        scene_label: str = "none",
        train_shapes: str = "scenes",
        shape_only_captions: float = 0.0,
        aspect: str = "square",
        classification_aspect: str | None = None,
        **kwargs: Any,
    ):
        for value in (aspect, classification_aspect or aspect):
            if value not in ASPECTS:
                raise ValueError(f"aspect and classification_aspect must be one of {ASPECTS}, got {value!r}")
        self.aspect = aspect
        self.classification_aspect = classification_aspect or aspect
        if scene_label not in SCENE_LABELS:
            raise ValueError(f"scene_label must be one of {SCENE_LABELS}, got {scene_label!r}")
        counting = scene_label == "count"
        kwargs.setdefault("classnames", COUNT_CLASSNAMES if counting else CLASSNAMES)
        kwargs.setdefault("templates", ["a picture of {}."] if counting else TEMPLATES)
        super().__init__(**kwargs)
        _pairs(classification_classes)  # validate
        if train_shapes not in _TRAIN_SHAPES:
            raise ValueError(f"train_shapes must be one of {_TRAIN_SHAPES}, got {train_shapes!r}")
        if train_shapes != "scenes" and counting:
            raise ValueError("scene_label='count' labels scenes: it needs train_shapes='scenes'")
        self.train_shapes = train_shapes
        self.shape_only_captions = shape_only_captions
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.n_classification = n_test if n_classification is None else n_classification
        self.image_size = image_size
        self.data_seed = data_seed
        self.captions_per_image = captions_per_image
        self.classification_classes = classification_classes
        self.scene_label = scene_label
        self.held_out_classes = [] if counting else list(HELD_OUT_CLASSES)
        self.default_data_config = DataConfig(image_size=(image_size, image_size))

    def _source(self, split: str) -> SyntheticShapes | _Interleaved | None:
        n = self.sizes.get(split, 0)
        if not n:
            return None
        scenes = SyntheticShapes(
            split,
            n,
            self.image_size,
            self.data_seed,
            self.captions_per_image,
            scene_label=self.scene_label,
            shape_only_captions=self.shape_only_captions if split == "train" else 0.0,
            aspect=self.aspect,
        )
        if split != "train" or self.train_shapes == "scenes":
            return scenes
        single = SyntheticShapes(
            split,
            n,
            self.image_size,
            self.data_seed,
            self.captions_per_image,
            "classification",
            "seen",
            shape_only_captions=self.shape_only_captions,
            aspect=self.aspect,
        )
        return single if self.train_shapes == "single" else _Interleaved(scenes, single, n)

    def _classification_source(self, split: str) -> SyntheticShapes | None:
        if not self.n_classification:
            return None
        if self.scene_label == "count":
            return SyntheticShapes(
                split,
                self.n_classification,
                self.image_size,
                self.data_seed,
                self.captions_per_image,
                scene_label="count",
                aspect=self.classification_aspect,
            )
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
            aspect=self.classification_aspect,
        )

    def _has_labels(self, split: str) -> bool:
        return bool(self.n_classification)

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None) -> ResumableLoader:
        """The base class's training loader; with ``scene_label="count"`` its batches carry ``labels``."""
        loader = super().train_dataloader(rank, world_size)
        if self.scene_label != "none" and isinstance(loader, MapLoader):
            loader.dataset.with_labels = True  # the batch builder attaches the scene labels
        return loader
