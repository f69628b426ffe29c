"""Hugging Face ``datasets`` as image-text data: hub or local data sets, parquet, imagefolder, streaming.

Images are read undecoded (the image column is cast to ``Image(decode=False)``) and decoded by mmclip's
tolerant decoder in the DataLoader workers, so broken files are skipped and counted instead of stopping
the run. An image column may also hold file paths (relative ones are resolved against ``image_root``) or
raw bytes. A caption column may hold one string or a list of captions per image.

Map-style data sets use mmclip's resumable map-style loader; ``streaming=True`` data sets are read as a
stream of shards (the data set's files), split by rank and worker and resumable like webdataset shards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mmclip.data.base import ImageTextDataModule
from mmclip.data.collate import RawSample
from mmclip.data.quality import SkipCounter

__all__ = ["HFDataModule", "HFMapSource", "HFStreamSource"]

logger = logging.getLogger(__name__)

_DEFAULT_SPLITS = {"train": "train", "val": "validation", "test": "test"}
_ALIASES = {"validation": ("validation", "val", "valid", "dev"), "test": ("test", "testing")}


class _Columns:
    """Turns a row (dict) into a :class:`RawSample` given the column names."""

    def __init__(
        self,
        image_column: str,
        caption_column: str,
        label_column: str | None,
        key_column: str | None,
        image_root: str | None,
        split: str,
    ):
        self.image_column, self.caption_column = image_column, caption_column
        self.label_column, self.key_column = label_column, key_column
        self.image_root, self.split = image_root, split

    def columns(self) -> list[str]:
        cols = [self.image_column, self.caption_column, self.label_column, self.key_column]
        return [c for c in dict.fromkeys(cols) if c is not None]

    def raw(self, row: Mapping[str, Any], index: int | str) -> RawSample:
        image = row.get(self.image_column)
        if isinstance(image, Mapping):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            image = image["bytes"] if image.get("bytes") is not None else image.get("path")
        if isinstance(image, str) and self.image_root is not None and not os.path.isabs(image):
            image = os.path.join(self.image_root, image)
        label = row.get(self.label_column) if self.label_column else None
        key = row.get(self.key_column) if self.key_column else None
        return RawSample(
            key=str(key) if key is not None else f"{self.split}-{index}",
            image=image,
            captions=row.get(self.caption_column),
            label=int(label) if isinstance(label, (int, float)) and label == label else None,
        )


def _undecoded(ds: Any, columns: _Columns) -> Any:
    import datasets

    missing = [c for c in columns.columns() if c not in (ds.column_names or [])]
    if missing:
        raise ValueError(
            f"columns {missing} not in the data set (it has {ds.column_names}); set the *_column options"
        )
    ds = ds.select_columns(columns.columns())
    feature = ds.features.get(columns.image_column) if ds.features else None
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(columns.image_column, datasets.Image(decode=False))
    return ds


class HFMapSource:
    """A map-style ``datasets.Dataset`` as a map-style source (``len`` + ``get(i)``)."""

    def __init__(self, dataset: Any, columns: _Columns):
        self.dataset = _undecoded(dataset, columns)
        self.columns = columns

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> RawSample:
        return self.columns.raw(self.dataset[index], index)

    def labelled_indices(self) -> list[int]:
        labels = self.dataset[self.columns.label_column]
        return [i for i, label in enumerate(labels) if label is not None and label >= 0]


class HFStreamSource:
    """A streaming ``datasets.IterableDataset`` as a stream source: its files are the shards."""

    def __init__(self, dataset: Any, columns: _Columns, batch_rows: int = 256):
        self.dataset = _undecoded(dataset, columns)
        self.columns = columns
        self.shards = list(range(self.dataset.num_shards))
        self.source_of = [0] * len(self.shards)
        self.batch_rows = batch_rows

    def num_samples(self) -> int | None:
        info = getattr(self.dataset, "info", None)
        splits = getattr(info, "splits", None) or {}
        split = getattr(self.dataset, "split", None)
        return splits[str(split)].num_examples if split is not None and str(split) in splits else None

    def iter_shard(self, index: int, skips: SkipCounter | None = None) -> Iterator[RawSample]:
        shard = self.dataset.shard(num_shards=len(self.shards), index=index)
        j = 0
        # .iter() reads the whole shard; plain iteration would split it again among DataLoader workers
        for batch in shard.iter(batch_size=self.batch_rows):
            n = len(next(iter(batch.values())))
            for i in range(n):
                yield self.columns.raw({k: v[i] for k, v in batch.items()}, f"{index}-{j}")
                j += 1


class HFDataModule(ImageTextDataModule):
    """Image-text data from Hugging Face ``datasets``.

    Args:
        path: a hub id or loader name ("parquet", "imagefolder", "csv", ...) for ``datasets.load_dataset``,
            or a directory written by ``save_to_disk`` (a ``DatasetDict`` or a single split).
        name: the data set configuration.
        data_files: files per split, e.g. ``{"train": "train.parquet", "validation": "val.parquet"}``.
        data_dir: data directory (e.g. an imagefolder with ``metadata.jsonl``).
        splits: mmclip split -> data set split (default train -> "train", val -> "validation", test -> "test";
            "validation" also finds "val", "valid" or "dev"); a missing split means no data for it.
        image_column: column with images (``datasets.Image``, bytes, or file paths).
        caption_column: column with a caption or a list of captions.
        label_column: column with class ids (for ``classification_dataloader``), or ``None``.
        key_column: column with unique sample keys (default: ``{split}-{row}``).
        image_root: directory relative image paths are resolved against.
        streaming: read the data as a stream (no download / conversion first).
        epoch_length: training samples per epoch (streaming mode, when the size is not known).
        shuffle_buffer: samples per worker shuffle buffer (streaming mode).
        cache_dir: ``datasets`` cache directory.
        load_kwargs: further ``datasets.load_dataset`` arguments.
        **kwargs: :class:`ImageTextDataModule` options.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
        data_dir: str | None = None,
        splits: Mapping[str, str] | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        label_column: str | None = None,
        key_column: str | None = None,
        image_root: str | None = None,
        streaming: bool = False,
        epoch_length: int | None = None,
        shuffle_buffer: int = 1000,
        cache_dir: str | None = None,
        load_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if isinstance(data_files, Mapping):  # plain containers (Hydra passes its own)
            data_files = {k: v if isinstance(v, str) else list(v) for k, v in data_files.items()}
        elif data_files is not None and not isinstance(data_files, str):
            data_files = list(data_files)
        self.path, self.name, self.data_files, self.data_dir = path, name, data_files, data_dir
        self.splits = dict(_DEFAULT_SPLITS if splits is None else splits)
        self.columns = dict(
            image_column=image_column,
            caption_column=caption_column,
            label_column=label_column,
            key_column=key_column,
            image_root=image_root,
        )
        self.streaming = streaming
        self.epoch_length = epoch_length
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = cache_dir
        self.load_kwargs = dict(load_kwargs or {})
        self._loaded: dict[str, Any] = {}

    def _load(self, split: str) -> Any:
        """The ``datasets`` object of mmclip split ``split`` (cached), or ``None``."""
        if split in self._loaded:
            return self._loaded[split]
        hf_split = self.splits.get(split)
        ds = None
        for name in _ALIASES.get(hf_split, (hf_split,)) if hf_split is not None else ():
            ds = self._load_hf(name)  # "validation" also finds "val", "valid", "dev"
            if ds is not None:
                break
        if ds is not None and self.classnames is None and self.columns["label_column"]:
            names = (
                getattr(ds.features.get(self.columns["label_column"]), "names", None) if ds.features else None
            )
            self.classnames = list(names) if names else None
        self._loaded[split] = ds
        return ds

    def _load_hf(self, hf_split: str) -> Any:
        import datasets

        if os.path.isdir(self.path) and (
            os.path.exists(os.path.join(self.path, "dataset_dict.json"))
            or os.path.exists(os.path.join(self.path, "state.json"))
        ):
            loaded = datasets.load_from_disk(self.path)
            if isinstance(loaded, datasets.DatasetDict):
                if hf_split not in loaded:
                    return None
                loaded = loaded[hf_split]
            return (
                loaded.to_iterable_dataset(num_shards=max(1, loaded.num_rows // 1000))
                if self.streaming
                else loaded
            )
        try:
            return datasets.load_dataset(
                self.path,
                self.name,
                data_files=self.data_files,
                data_dir=self.data_dir,
                split=hf_split,
                streaming=self.streaming,
                cache_dir=self.cache_dir,
                **self.load_kwargs,
            )
        except ValueError as err:
            if "split" in str(err).lower():
                logger.info("No split %r in %s (%s); that split has no data.", hf_split, self.path, err)
                return None
            raise

    def setup(self, stage: str | None = None) -> None:
        for split in ("train",) if stage == "fit" else self.splits:
            self._load(split)

    def _source(self, split: str) -> HFMapSource | HFStreamSource | None:
        ds = self._load(split)
        if ds is None:
            return None
        columns = _Columns(split=split, **self.columns)  # type: ignore[arg-type]
        return HFStreamSource(ds, columns) if self.streaming else HFMapSource(ds, columns)

    def _has_labels(self, split: str) -> bool:
        return self.columns["label_column"] is not None and self._load(split) is not None

    def _labelled_indices(self, source: Any, split: str) -> list[int] | None:
        return source.labelled_indices() if isinstance(source, HFMapSource) else None

    def _stream_options(self) -> dict[str, Any]:
        return {"shuffle_buffer": self.shuffle_buffer}

    def _stream_num_batches(self, source: Any, world_size: int) -> int | None:
        if self.epoch_length is not None:
            return self.epoch_length // (world_size * self.batch_size)
        return super()._stream_num_batches(source, world_size)
