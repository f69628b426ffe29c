"""The shared base of mmclip's data modules: transforms and tokenizer from the model, loaders, skip stats.

A subclass only says where its data is: :meth:`ImageTextDataModule._source` returns, per split, either a
map-style source (``len`` + ``get(i) -> RawSample``) or a stream source (shards read front to back). The
base class builds the loaders the training task and the evaluation callbacks use:

* ``train_dataloader()``: a resumable loader (``__len__``, ``state_dict``, ``load_state_dict``) yielding
  ``ImageTextBatch`` with one random caption per image, split by rank itself (recipes set the trainer's
  ``use_distributed_sampler: false``);
* ``val_dataloader()`` / ``test_dataloader()`` / ``retrieval_dataloader(split, rank, world_size)``: every
  caption of every image (``caption_image_index`` set), sharded by rank;
* ``classification_dataloader(split, rank, world_size)``: batches with ``labels``, or ``None``.

NaFlex towers (SigLIP 2's) get each image at its own aspect ratio as patches (``NaFlexImages`` batches),
padded to a fixed patch count or batched under a patch budget (``naflex_batching``); ``naflex=False`` gives
them square centre crops instead.

Training epochs are exactly-once (see :mod:`mmclip.data.loader` and :mod:`mmclip.data.stream`). The training
loader counts every batch's skipped samples by reason, and its used samples, in ``skip_stats`` (a
:class:`mmclip.data.quality.SkipStats`; ``skip_stats.as_dict()`` gives ``data/skipped/<reason>`` metrics)
and raises :class:`mmclip.data.quality.DataQualityError` above ``max_skip_fraction``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmclip.data.collate import SampleProcessor
from mmclip.data.loader import (
    BudgetMapLoader,
    MapEvalDataset,
    MapLoader,
    MapSource,
    ResumableLoader,
    _identity,
)
from mmclip.data.quality import DEFAULT_MAX_PIXELS, SkipStats
from mmclip.data.stream import StreamDataset, StreamLoader, StreamSource
from mmclip.data.transforms import ImageTransform, image_transform
from mmclip.tokenizers import Tokenizer, get_tokenizer
from mmclip.towers.base import DataConfig

if TYPE_CHECKING:
    from mmclip.data.naflex import NaFlexPreprocess

__all__ = ["ImageTextDataModule"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NAFLEX_BATCHING = ("fixed", "budget")


def _is_stream(source: Any) -> bool:
    return hasattr(source, "iter_shard")


def _as_data_config(value: DataConfig | Mapping[str, Any] | None) -> DataConfig | None:
    """A ``DataConfig`` from itself or from a mapping (as a Hydra recipe gives it)."""
    if value is None or isinstance(value, DataConfig):
        return value
    kw = dict(value)
    size = kw.get("image_size", DataConfig.image_size)
    kw["image_size"] = (
        (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(x) for x in size)
    )
    for key in ("mean", "std"):
        if key in kw:
            kw[key] = tuple(float(x) for x in kw[key])
    return DataConfig(**kw)


class ImageTextDataModule(L.LightningDataModule):
    """Base data module (see the module docstring). Subclasses implement :meth:`_source`.

    Args:
        data_config: the image tower's ``DataConfig`` (size, mean, std, interpolation, resize mode);
            ``None`` uses the subclass default. The training task sets it with :meth:`configure`.
        tokenizer: a tokenizer, a name/path for :func:`mmclip.tokenizers.get_tokenizer`, or ``None`` for CLIP's.
        context_length: tokenizer row length (``None``: the tokenizer's default).
        batch_size: training samples per batch on each rank.
        eval_batch_size: evaluation batch size (``None``: ``batch_size``).
        num_workers: DataLoader workers per rank.
        seed: base seed of shuffling and augmentation (training is reproducible and resumable from it).
        max_skip_fraction: ceiling on the fraction of skipped samples (see :class:`SkipStats`).
        min_skip_samples: samples seen before the ceiling is enforced.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect range.
        color_jitter: ``(brightness, contrast, saturation, hue)`` or one float; ``None`` disables.
        color_jitter_p: probability of jittering a training sample.
        grayscale_p: probability of a gray training sample.
        max_pixels: decompression-bomb ceiling (pixels, read from the header).
        draft: decode JPEGs at a reduced size when much larger than needed (faster; not pixel-exact).
        pin_memory: pin batches in page-locked memory.
        prefetch_factor: batches prepared ahead by each worker.
        keep_captions: keep the caption strings in batches.
        classnames: class names for zero-shot classification (``None``: the data set's own, if any).
        templates: zero-shot prompt templates with one ``{}`` (``None``: the default set).
        naflex: give a NaFlex tower (SigLIP 2's; its ``data_config.extra["naflex"]``) each image at its own
            aspect ratio as patches (``True``, the default); ``False`` gives it square centre crops of the
            tower's ``image_size`` as plain tensors instead (the same patch count when that size is
            ``sqrt(max_num_patches)`` patches a side; ``max_num_patches`` is then unused). Fixed-size towers are
            not affected.
        max_num_patches: a NaFlex tower's patch budget per image (``None``: the tower's).
        naflex_batching: how NaFlex training batches spend their patches. "fixed": ``batch_size`` images,
            each padded to ``max_num_patches`` (one shape for every batch). "budget": every batch holds at
            most ``batch_size * max_num_patches`` patches; each batch draws a patch budget per image from
            ``naflex_seq_lens`` and holds as many images as fit (more, smaller images or fewer, larger ones).
            Map-style data only. Evaluation batches are padded to their longest image either way.
        naflex_seq_lens: the per-image patch budgets of "budget" batching (``None``: 1/4, 1/2, 3/4 and all of
            ``max_num_patches``).
    """

    default_data_config = DataConfig()

    def __init__(
        self,
        *,
        data_config: DataConfig | Mapping[str, Any] | None = None,
        tokenizer: str | Tokenizer | None = "clip",
        context_length: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int = 0,
        max_skip_fraction: float = 0.1,
        min_skip_samples: int = 200,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float | Sequence[float] | None = None,
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        keep_captions: bool = True,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        naflex: bool = True,
        max_num_patches: int | None = None,
        naflex_batching: str = "fixed",
        naflex_seq_lens: Sequence[int] | None = None,
    ):
        super().__init__()
        if naflex_batching not in NAFLEX_BATCHING:
            raise ValueError(f"naflex_batching must be one of {NAFLEX_BATCHING}, got {naflex_batching!r}")
        if max_num_patches is not None and max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches}")
        if naflex_seq_lens is not None and (not naflex_seq_lens or min(naflex_seq_lens) < 1):
            raise ValueError(f"naflex_seq_lens must be positive patch counts, got {naflex_seq_lens}")
        self.naflex = bool(naflex)
        self.max_num_patches = max_num_patches
        self.naflex_batching = naflex_batching
        self.naflex_seq_lens = None if naflex_seq_lens is None else [int(n) for n in naflex_seq_lens]
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.data_config = _as_data_config(data_config)
        self._tokenizer_spec: Any = tokenizer
        self._tokenizer: Any = None
        self.context_length = context_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.skip_stats = SkipStats(max_skip_fraction, min_skip_samples)
        self.augment = dict(
            scale=tuple(scale),
            ratio=tuple(ratio),
            color_jitter=color_jitter,
            color_jitter_p=color_jitter_p,
            grayscale_p=grayscale_p,
        )
        self.max_pixels = max_pixels
        self.draft = draft
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.keep_captions = keep_captions
        self.classnames: list[str] | None = list(classnames) if classnames is not None else None
        self.templates: list[str] | None = list(templates) if templates is not None else None

    # ----------------------------------------------------------------------------------------- settings
    def configure(
        self,
        data_config: DataConfig | Mapping[str, Any] | None = None,
        tokenizer: str | Tokenizer | None = None,
    ) -> ImageTextDataModule:
        """Set the image tower's ``DataConfig`` and/or the tokenizer (the training task calls this with the
        model's before ``setup``). ``None`` leaves a setting unchanged. Returns ``self``."""
        if data_config is not None:
            self.data_config = _as_data_config(data_config)
        if tokenizer is not None:
            self._tokenizer_spec, self._tokenizer = tokenizer, None
        return self

    @property
    def tokenizer(self) -> Any:
        """The built tokenizer (built on first use from the name given to the constructor)."""
        if self._tokenizer is None:
            spec = self._tokenizer_spec
            if spec is None or isinstance(spec, str | dict) or hasattr(spec, "__fspath__"):
                self._tokenizer = get_tokenizer(spec, context_length=self.context_length)
            else:
                self._tokenizer = spec
            if self.num_workers > 0:  # Rust tokenizers must not use threads before the workers fork
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return self._tokenizer

    def describe(self) -> str:
        """One line for logs: the data module, batch size, workers and image preprocessing."""
        cfg = self.image_config()
        naflex = cfg.extra.get("naflex")
        images = (
            f"naflex(patch_size={naflex['patch_size']}, max_num_patches={naflex['max_num_patches']}, "
            f"batching={self.naflex_batching!r})"
            if naflex
            else f"image_size={tuple(cfg.image_size)}, resize_mode={cfg.resize_mode!r}"
        )
        return (
            f"{type(self).__name__}(batch_size={self.batch_size}, num_workers={self.num_workers}, "
            f"{images}, seed={self.seed}, max_skip_fraction={self.skip_stats.max_skip_fraction:g})"
        )

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints by Lightning: the skip counts, so the skipped fraction spans resumes."""
        return {"skip_stats": self.skip_stats.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "skip_stats" in state_dict:
            self.skip_stats.load_state_dict(state_dict["skip_stats"])

    def image_config(self) -> DataConfig:
        """The ``data_config`` images are prepared with: the tower's, with this module's NaFlex choices applied
        (``naflex=False``: square centre crops; ``max_num_patches``: the patch budget)."""
        cfg = self.data_config or self.default_data_config
        naflex = cfg.extra.get("naflex")
        if not naflex:
            return cfg
        extra = {k: v for k, v in cfg.extra.items() if k != "naflex"}
        if not self.naflex:
            return dataclasses.replace(cfg, resize_mode="shortest", extra=extra)
        if self.max_num_patches is not None:
            extra["naflex"] = {**naflex, "max_num_patches": self.max_num_patches}
            return dataclasses.replace(cfg, extra=extra)
        return cfg

    def transform(self, train: bool) -> ImageTransform | NaFlexPreprocess:
        """The image transform for training or evaluation, from :meth:`image_config`."""
        cfg = self.image_config()
        return (
            image_transform(cfg, train=train, **self.augment) if train else image_transform(cfg, train=False)
        )

    def _processor(self, train: bool) -> SampleProcessor:
        return SampleProcessor(
            self.transform(train), train=train, max_pixels=self.max_pixels, draft=self.draft
        )

    def _rank_world(self, rank: int | None, world_size: int | None) -> tuple[int, int]:
        if rank is not None and world_size is not None:
            return rank, world_size
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # ------------------------------------------------------------------------------------ subclass API
    def _source(self, split: str) -> MapSource | StreamSource | None:
        """The data of ``split`` ("train", "val", "test"), or ``None`` if there is none."""
        raise NotImplementedError

    def _classification_source(self, split: str) -> MapSource | StreamSource | None:
        """The labelled data of ``split`` (default: the same data as :meth:`_source`)."""
        return self._source(split)

    def _labelled_indices(self, source: MapSource, split: str) -> list[int] | None:
        """Indices of ``source`` with a label >= 0 (``None`` if the data has no labels)."""
        return None

    def _has_labels(self, split: str) -> bool:
        return False

    def _stream_options(self) -> dict[str, Any]:
        """Extra :class:`StreamLoader` options (shuffle buffer, resampling, weights)."""
        return {}

    def _stream_num_batches(self, source: StreamSource, world_size: int) -> int | None:
        """Training batches per rank per epoch for a stream source; ``None``: one exactly-once pass over the
        shards, planned by the loader from their sizes."""
        sizes = source.shard_sizes() if hasattr(source, "shard_sizes") else None
        if (
            not self._stream_options().get("resampled")
            and sizes is not None
            and all(n is not None for n in sizes)
        ):
            return None
        n = source.num_samples()
        if n is None:
            raise ValueError(
                f"{type(self).__name__}: the number of training samples is unknown (for shards: no sizes.json "
                "next to them and they are not local files); pass epoch_length=<samples per epoch>"
            )
        return n // (world_size * self.batch_size)

    # ------------------------------------------------------------------------------------ loaders
    def train_dataloader(self, rank: int | None = None, world_size: int | None = None) -> ResumableLoader:
        """Resumable training loader for this rank (``rank``/``world_size`` default to the trainer's)."""
        rank, world_size = self._rank_world(rank, world_size)
        source = self._source("train")
        if source is None:
            raise ValueError(f"{type(self).__name__} has no training data")
        common = dict(
            processor=self._processor(train=True),
            tokenizer=self.tokenizer,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            keep_captions=self.keep_captions,
            with_labels=False,
            skip_stats=self.skip_stats,
        )
        budget = self.naflex_batching == "budget" and hasattr(common["processor"].transform, "max_num_patches")
        if _is_stream(source):
            if budget:
                raise ValueError(
                    f"{type(self).__name__}: naflex_batching='budget' needs map-style data (synthetic, HF, CSV); "
                    "streamed shards take naflex_batching='fixed'"
                )
            num_batches = self._stream_num_batches(source, world_size)  # type: ignore[arg-type]
            return StreamLoader(source, num_batches=num_batches, **self._stream_options(), **common)  # type: ignore[arg-type]
        if budget:
            max_patches = common["processor"].transform.max_num_patches
            seq_lens = self.naflex_seq_lens or sorted({max(1, math.ceil(max_patches * f / 4)) for f in (1, 2, 3, 4)})
            if max(seq_lens) > max_patches:
                raise ValueError(
                    f"naflex_seq_lens {seq_lens} go above the {max_patches} patches per image of this tower: lower "
                    "them, or raise data.max_num_patches"
                )
            return BudgetMapLoader(source, seq_lens=seq_lens, token_budget=self.batch_size * max_patches, **common)  # type: ignore[arg-type]
        return MapLoader(source, **common)  # type: ignore[arg-type]

    def _eval_loader(self, split: str, rank: int, world_size: int, classification: bool) -> DataLoader | None:
        source = self._classification_source(split) if classification else self._source(split)
        if source is None:
            return None
        processor = self._processor(train=False)
        if _is_stream(source):
            dataset = StreamDataset(
                source,  # type: ignore[arg-type]
                processor,
                self.tokenizer,
                self.eval_batch_size,
                train=False,
                rank=rank,
                world_size=world_size,
                workers=self.num_workers,
                label_filter=classification,
                keep_captions=self.keep_captions,
                with_labels=classification,
            )
            return DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                pin_memory=self.pin_memory,
            )
        indices = self._labelled_indices(source, split) if classification else None  # type: ignore[arg-type]
        if indices is None:
            indices = list(range(len(source)))  # type: ignore[arg-type]
        mine = indices[rank * len(indices) // world_size : (rank + 1) * len(indices) // world_size]
        b = self.eval_batch_size
        chunks = [mine[i : i + b] for i in range(0, len(mine), b)]
        dataset = MapEvalDataset(source, processor, self.tokenizer, self.keep_captions, classification)  # type: ignore[arg-type]
        workers = min(self.num_workers, len(chunks))
        return DataLoader(
            dataset,
            batch_sampler=chunks,
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
        )

    def retrieval_dataloader(
        self, split: str = "val", rank: int = 0, world_size: int = 1
    ) -> DataLoader | None:
        """Every caption of every image of ``split`` (this rank's share), or ``None`` if there is no such split."""
        return self._eval_loader(split, rank, world_size, classification=False)

    def classification_dataloader(
        self, split: str = "test", rank: int = 0, world_size: int = 1
    ) -> DataLoader | None:
        """Labelled images of ``split`` (this rank's share) with ``labels`` set, or ``None`` without labels."""
        if not self._has_labels(split):
            return None
        return self._eval_loader(split, rank, world_size, classification=True)

    def val_dataloader(self) -> DataLoader | list:
        """Retrieval batches of the "val" split, sharded by the trainer's rank (``[]`` if there is none)."""
        rank, world_size = self._rank_world(None, None)
        loader = self.retrieval_dataloader("val", rank, world_size)
        return [] if loader is None else loader

    def test_dataloader(self) -> DataLoader | list:
        """Retrieval batches of the "test" split, sharded by the trainer's rank (``[]`` if there is none)."""
        rank, world_size = self._rank_world(None, None)
        loader = self.retrieval_dataloader("test", rank, world_size)
        return [] if loader is None else loader
