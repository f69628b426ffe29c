"""LiT from cached embeddings: a data module over an embedding store instead of images.

Locked-image tuning (LiT) runs the frozen image tower on every image of every epoch. When the tower and
the image preprocessing are fixed, its outputs can be computed once (``mmclip embed`` writes them as an
*embedding store*) and the text side trained against them: :class:`CachedEmbeddingDataModule` reads a
store and yields the usual ``ImageTextBatch`` with ``images`` = the (B, D) float32 embedding rows, for a
``DualEncoder`` whose image tower is ``{"name": "precomputed", "dim": D}`` with ``image_proj="none"``.

The store (``OUT/``, written by ``mmclip embed``): ``meta.json`` (``format: mmclip-embeddings``,
``version: 1``, ``modality``, ``dim``, ``num_shards``, ...), and per shard ``i`` ``emb-{i:05d}.npy``
(float16, (n_i, D)) and ``ids-{i:05d}.parquet`` (columns ``index``, ``id``, ``caption`` / ``captions``,
``label``). A shard is complete iff its ids file exists; every shard must be complete to train.

Everything else is the base data module's: the training loader is split by rank, resumable mid-epoch and
picks one random caption per sample (seeded by (seed, epoch, index), the same choice an image data module
makes for the same index); evaluation loaders carry every caption and ``caption_image_index``. There is
no image augmentation: an embedding is fixed (the embeddings are of the evaluation transform's images).
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmclip.data.base import ImageTextDataModule
from mmclip.data.collate import ProcessedSample, RawSample, SampleProcessor
from mmclip.data.quality import SkipCounter, SkipSample, decode_captions
from mmclip.towers.base import DataConfig

__all__ = ["CachedEmbeddingDataModule", "EmbeddingSource"]

logger = logging.getLogger(__name__)


class EmbeddingSource:
    """A complete image embedding store as a map-style source: ``len``, ``get(i) -> RawSample``.

    ``get(i).image`` is the i-th embedding row (float16 numpy (D,), memory-mapped), ``captions`` the
    sample's captions (the ``captions`` column, else ``[caption]``), ``key`` its ``id`` and ``label`` its
    ``label`` (None without that column). Samples are in shard order (the source's order, skipped
    samples absent). The files are read with :class:`mmclip.embedding.store.EmbeddingStore`.

    Args:
        path: the store folder.

    Raises:
        FileNotFoundError: no ``meta.json`` in ``path``.
        ValueError: not an image embedding store of a known version, an incomplete store (a shard
            without its ids file), mismatched shard files, or no caption column.
    """

    def __init__(self, path: str | Path) -> None:
        import pyarrow as pa

        from mmclip.embedding.store import EmbeddingStore

        self.path = Path(path)
        store = EmbeddingStore(self.path)  # checks the format and version
        self.meta: dict[str, Any] = store.meta
        if self.meta.get("modality") != "image":
            raise ValueError(
                f"{self.path} holds {self.meta.get('modality')!r} embeddings; LiT from cache needs an image "
                "store (`mmclip embed` of an image-caption source)"
            )
        self.dim = store.dim
        missing = store.missing_shards
        if missing:
            raise ValueError(
                f"the embedding store {self.path} is incomplete: {len(missing)} of {store.num_shards} shards are "
                f"not written (e.g. shard {missing[0]}); run `mmclip embed` again with the same arguments (it "
                "resumes)"
            )
        self._embeddings: list[np.ndarray] = []
        tables = []
        for i in range(store.num_shards):
            emb = store.shard_embeddings(i)  # (n_i, D) float16, memory-mapped
            table = store.shard_ids(i)
            if emb.ndim != 2 or emb.shape[1] != self.dim or emb.shape[0] != table.num_rows:
                raise ValueError(
                    f"shard {i} of {self.path}: embeddings {tuple(emb.shape)} do not match {table.num_rows} id "
                    f"rows of width {self.dim}; the store is corrupt, write it again"
                )
            self._embeddings.append(emb)
            tables.append(table)
        self._starts = np.cumsum([0] + [len(e) for e in self._embeddings]).tolist()  # shard i starts at [i]
        table = pa.concat_tables(tables, promote_options="permissive") if tables else None
        names = set(table.column_names) if table is not None else set()
        if "captions" in names:
            self._captions = table.column("captions").combine_chunks()
            self._single = False
        elif "caption" in names:
            self._captions = table.column("caption").combine_chunks()
            self._single = True
        else:
            raise ValueError(
                f"the embedding store {self.path} has no 'captions' or 'caption' column: LiT needs captions, "
                "embed an image-caption source"
            )
        self._ids: list[str] = [str(x) for x in table.column("id").to_pylist()]
        self._labels: list[int] | None = table.column("label").to_pylist() if "label" in names else None

    def __len__(self) -> int:
        return self._starts[-1]

    def embedding(self, index: int) -> np.ndarray:
        """Row ``index`` of the store, float16 (D,)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} embeddings")
        shard = bisect.bisect_right(self._starts, index) - 1
        return self._embeddings[shard][index - self._starts[shard]]

    def embeddings(self) -> np.ndarray:
        """All rows, float16 (N, D)."""
        if not self._embeddings:
            return np.zeros((0, self.dim), dtype=np.float16)
        return np.concatenate([np.asarray(e) for e in self._embeddings])

    def key(self, index: int) -> str:
        return self._ids[index]

    def get(self, index: int) -> RawSample:
        captions = self._captions[index].as_py()
        label = None if self._labels is None else self._labels[index]
        return RawSample(
            key=self._ids[index],
            image=self.embedding(index),
            captions=[captions] if self._single else captions,
            label=label,
        )

    def __getitem__(self, index: int) -> RawSample:
        return self.get(index)


class _EmbeddingProcessor(SampleProcessor):
    """A :class:`SampleProcessor` whose "image" is an embedding row: no decoding, no transform.

    Captions are chosen as the image processor chooses them (one with the sample's ``rng`` in training,
    all in evaluation), so an image run and a cached run of the same data see the same captions.
    """

    def __init__(self, train: bool) -> None:
        self.train = train
        self.pad_to = None
        self.skips = SkipCounter()

    def __call__(
        self, raw: RawSample, rng: random.Random | None = None, max_num_patches: int | None = None
    ) -> ProcessedSample | None:
        """As :meth:`SampleProcessor.__call__` (``max_num_patches``: unused, an embedding has no patches)."""
        try:
            captions = decode_captions(raw.captions)
        except SkipSample as skip:
            self.skips.skip(skip.reason, raw.key, skip.detail)
            return None
        if self.train and len(captions) > 1:
            captions = [captions[(rng or random.Random()).randrange(len(captions))]]
        image = torch.from_numpy(np.asarray(raw.image, dtype=np.float32).copy())  # (D,)
        label = raw.label if raw.label is None else int(raw.label)
        return ProcessedSample(key=raw.key, image=image, captions=captions, label=label)


class CachedEmbeddingDataModule(ImageTextDataModule):
    """Batches of cached image embeddings and their captions (see the module docstring).

    Example (LiT on the text side only)::

        dm = CachedEmbeddingDataModule(train_store="emb/train", val_store="emb/val", batch_size=256)
        task = ContrastiveTask(
            model=None,
            image_tower={"name": "precomputed", "dim": 512},
            text_tower={"name": "clip_text", ...},
            model_kwargs={"embed_dim": 512, "image_proj": "none"},
        )
        dm.configure(data_config=task.data_config, tokenizer=task.tokenizer)

    Args:
        train_store: the training store folder.
        val_store: the store of the retrieval split "val" (optional).
        test_store: the store of the split "test" (optional).
        **kwargs: :class:`ImageTextDataModule` options (``tokenizer``, ``batch_size``, ``seed``,
            ``num_workers``, ...); the image options (``data_config``, augmentation) have no effect.
    """

    def __init__(
        self,
        train_store: str | None = None,
        val_store: str | None = None,
        test_store: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stores = {"train": train_store, "val": val_store, "test": test_store}
        self._sources: dict[str, EmbeddingSource] = {}

    def _source(self, split: str) -> EmbeddingSource | None:
        path = self.stores.get(split)
        if path is None:
            return None
        if split not in self._sources:
            source = EmbeddingSource(path)
            dims = {s.dim for s in self._sources.values()}
            if dims and source.dim not in dims:
                raise ValueError(
                    f"the {split} store {path} holds {source.dim}-dim embeddings, the other stores {sorted(dims)}: "
                    "embed every split with the same model"
                )
            self._sources[split] = source
        return self._sources[split]

    @property
    def dim(self) -> int:
        """Width of the embeddings (of the first store given)."""
        for split in ("train", "val", "test"):
            source = self._source(split)
            if source is not None:
                return source.dim
        raise ValueError("CachedEmbeddingDataModule was given no store (train_store, val_store, test_store)")

    def configure(
        self,
        data_config: DataConfig | Mapping[str, Any] | None = None,
        tokenizer: Any = None,
    ) -> CachedEmbeddingDataModule:
        """Sets the tokenizer; checks that ``data_config`` is a precomputed tower's of the store's width.

        Raises:
            ValueError: the model's image tower is not ``precomputed`` or has another ``dim``.
        """
        if isinstance(data_config, DataConfig):
            want = data_config.extra.get("precomputed_dim")
            if want is None:
                raise ValueError(
                    "CachedEmbeddingDataModule yields embeddings, not images: the model's image tower must be "
                    "{'name': 'precomputed', 'dim': D} with image_proj='none' (recipe: image_tower=precomputed)"
                )
            if int(want) != self.dim:
                raise ValueError(
                    f"the precomputed image tower has dim={want} but the stores hold {self.dim}-dim embeddings: "
                    f"set image_tower.dim={self.dim} (and the model's embed_dim)"
                )
        super().configure(data_config=None, tokenizer=tokenizer)
        return self

    def _processor(self, train: bool) -> SampleProcessor:
        return _EmbeddingProcessor(train=train)

    def transform(self, train: bool) -> Any:
        raise TypeError("CachedEmbeddingDataModule has no image transform: its samples are embeddings")

    def describe(self) -> str:
        stores = ", ".join(f"{k}={v}" for k, v in self.stores.items() if v is not None)
        return (
            f"{type(self).__name__}({stores}, batch_size={self.batch_size}, num_workers={self.num_workers}, "
            f"seed={self.seed})"
        )
