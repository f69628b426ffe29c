"""Corpora to embed, in a deterministic order, cut into fixed-size output shards.

A source is a sequence of ``N`` samples with stable positions ``0 .. N-1``: an image folder (files found
recursively, sorted by relative path), webdataset shards (tar order, shard after shard), a Hugging Face
dataset written with ``save_to_disk`` (row order) or a text file (one text per line). Output shard ``i``
of an embedding store holds positions ``[i * S, min((i + 1) * S, N))`` (see :mod:`mmclip.embedding.writer`), so
any shard can be recomputed alone, on any rank, in any order, with the same batches.

:class:`EmbedDataset` reads a list of output shards in a DataLoader's workers (whole shards per worker)
and yields :class:`EmbedBatch` es: at most ``batch_size`` usable samples of one shard, the last batch of
each shard flagged ``last`` (it may be empty when every sample of the shard's tail was skipped). Images
that cannot be decoded are skipped and counted (:class:`mmclip.data.quality.SkipCounter`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmclip.data.collate import RawSample
from mmclip.data.quality import DEFAULT_MAX_PIXELS, SkipCounter, SkipSample, decode_caption, decode_captions
from mmclip.data.quality import decode_image as _decode_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCE_KINDS",
    "EmbedBatch",
    "EmbedDataset",
    "EmbedSource",
    "HFDiskSource",
    "ImageFolderSource",
    "ShardsSource",
    "TextFileSource",
    "build_source",
    "make_loader",
    "shard_bounds",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _digest(parts: Sequence[str] | bytes) -> str:
    h = hashlib.blake2b(digest_size=8)
    if isinstance(parts, bytes):
        h.update(parts)
    else:
        for p in parts:
            h.update(p.encode("utf-8", "surrogateescape"))
            h.update(b"\x00")
    return h.hexdigest()


def shard_bounds(shard: int, shard_size: int, num_samples: int) -> tuple[int, int]:
    """Source positions ``[start, end)`` of output shard ``shard``."""
    start = shard * shard_size
    return start, min(start + shard_size, num_samples)


class EmbedSource(Protocol):
    """What :class:`EmbedDataset` needs from a corpus."""

    kind: str
    modality: str  # "image" | "text": what is embedded
    has_captions: bool
    has_labels: bool

    def __len__(self) -> int: ...

    def spec(self) -> dict[str, Any]:
        """Plain description for ``meta.json`` (kind, absolute path, options, content fingerprint)."""
        ...

    def iter_range(self, start: int, end: int, skips: SkipCounter) -> Iterator[tuple[int, RawSample]]:
        """``(position, sample)`` for positions in ``[start, end)``, in order (unreadable ones may be absent)."""
        ...


class ImageFolderSource:
    """Every image file under ``path`` (recursive), sorted by path relative to it; the id is that path.

    Args:
        path: the folder.
        extensions: file name endings that count as images (case-insensitive).
    """

    kind = "images"
    modality = "image"
    has_captions = False
    has_labels = False

    def __init__(self, path: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = Path(path).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        files = []
        for directory, dirs, names in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel_dir = os.path.relpath(directory, self.root)
            for name in names:
                if not name.startswith(".") and name.lower().endswith(self.extensions):
                    files.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
        self.files = sorted(files)

    def __len__(self) -> int:
        return len(self.files)

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.root),
            "extensions": list(self.extensions),
            "fingerprint": _digest(self.files),
        }

    def iter_range(self, start: int, end: int, skips: SkipCounter) -> Iterator[tuple[int, RawSample]]:
        for i in range(start, end):
            rel = self.files[i]
            yield i, RawSample(rel, str(self.root / rel), None, None)


def _absolute(spec: str) -> str:
    """Local shard patterns made absolute (``::``-separated lists too); URLs and ``pipe:`` kept as they are."""
    parts = [p.strip() for p in spec.split("::")]
    return "::".join(
        p if "://" in p or p.startswith("pipe:") or os.path.isabs(p) else os.path.abspath(p) for p in parts
    )


class ShardsSource:
    """Webdataset shards (see :class:`mmclip.data.wds.ShardSource`); the id is the sample key.

    The number of samples of every shard must be known (``sizes.json`` next to them, or local files whose
    headers are scanned) so positions can be located without reading the data.

    Args:
        path: shard spec, e.g. ``"data/train-{000000..000099}.tar"``.
        image_keys, caption_keys, json_key, label_key: see ``ShardSource``.
    """

    kind = "shards"
    modality = "image"
    has_captions = True
    has_labels = True

    def __init__(
        self,
        path: str | Sequence[str],
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"),
        caption_keys: Sequence[str] = ("txt", "text", "caption"),
        json_key: str = "json",
        label_key: str = "cls",
    ):
        from mmclip.data.wds import ShardSource, shard_size

        self.path = _absolute(path) if isinstance(path, str) else [_absolute(p) for p in path]
        self.shards = ShardSource(self.path, image_keys, caption_keys, json_key, label_key)
        counts = []
        for url in self.shards.shards:
            n = shard_size(url)
            if n is None:
                raise ValueError(
                    f'the number of samples in {url} is unknown: put a sizes.json ({{"shard.tar": count}}) next '
                    "to the shards, or use local files (their headers are scanned)"
                )
            counts.append(n)
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (num_tars + 1,)
        self.options = {
            "image_keys": list(image_keys),
            "caption_keys": list(caption_keys),
            "json_key": json_key,
            "label_key": label_key,
        }

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def spec(self) -> dict[str, Any]:
        names = [f"{os.path.basename(u)}:{n}" for u, n in zip(self.shards.shards, self.counts, strict=True)]
        return {"kind": self.kind, "path": self.path, **self.options, "fingerprint": _digest(names)}

    def iter_range(self, start: int, end: int, skips: SkipCounter) -> Iterator[tuple[int, RawSample]]:
        from mmclip.data.wds import iter_tar

        first = max(int(np.searchsorted(self.offsets, start, side="left")) - 1, 0)
        for t in range(first, len(self.counts)):
            offset = int(self.offsets[t])
            if self.counts[t] == 0:  # no positions; read it where it sits, so a damaged one is counted
                if start <= offset < end or offset == end == len(self):
                    for _ in iter_tar(self.shards.shards[t], skips):
                        pass
                continue
            if offset + self.counts[t] <= start:
                continue
            if offset >= end:
                return
            for j, sample in enumerate(iter_tar(self.shards.shards[t], skips)):
                if j >= self.counts[t]:
                    logger.warning(
                        "%s holds more samples than the %d counted for it (sizes.json out of date?); the rest "
                        "are not embedded",
                        self.shards.shards[t],
                        self.counts[t],
                    )
                    break
                pos = offset + j
                if pos < start:
                    continue
                if pos >= end:
                    return  # closes the tar
                yield pos, self.shards.to_raw(sample)


class HFDiskSource:
    """A Hugging Face dataset written with ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``).

    Args:
        path: the folder ``save_to_disk`` wrote.
        split: the split of a ``DatasetDict`` (default: its only split, else "train").
        image_column: column with images (``datasets.Image``, bytes or file paths).
        caption_column: column with a caption or a list of captions; default "captions" if there is one,
            else "caption" if there is one, else none.
        label_column: column with class ids; default "label" if there is one.
        key_column: column with the sample id; default the row index.
        image_root: folder relative image paths are resolved against (default: ``path``).
    """

    kind = "hf"
    modality = "image"

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str | None = None,
        image_column: str = "image",
        caption_column: str | None = None,
        label_column: str | None = None,
        key_column: str | None = None,
        image_root: str | None = None,
    ):
        import datasets

        self.root = Path(path).resolve()
        loaded = datasets.load_from_disk(str(self.root))
        if isinstance(loaded, datasets.DatasetDict):
            names = list(loaded)
            if split is None:
                split = names[0] if len(names) == 1 else "train" if "train" in loaded else None
            if split is None or split not in loaded:
                raise ValueError(f"{self.root} holds splits {names}; choose one with source.split=NAME")
            loaded = loaded[split]
        cols = loaded.column_names
        if image_column not in cols:
            raise ValueError(f"no column {image_column!r} in {self.root} (columns: {cols}); set image_column")
        if caption_column is None:
            caption_column = "captions" if "captions" in cols else "caption" if "caption" in cols else None
        if label_column is None and "label" in cols:
            label_column = "label"
        for name, col in (
            ("caption_column", caption_column),
            ("label_column", label_column),
            ("key_column", key_column),
        ):
            if col is not None and col not in cols:
                raise ValueError(f"{name}={col!r} is not a column of {self.root} (columns: {cols})")
        self.fingerprint = str(getattr(loaded, "_fingerprint", "")) or _digest([str(len(loaded))])
        keep = [c for c in dict.fromkeys([image_column, caption_column, label_column, key_column]) if c]
        ds = loaded.select_columns(keep)
        feature = ds.features.get(image_column)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = ds
        self.split = split
        self.image_column, self.caption_column = image_column, caption_column
        self.label_column, self.key_column = label_column, key_column
        self.image_root = image_root or str(self.root)
        self.has_captions = caption_column is not None
        self.has_labels = label_column is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.root),
            "split": self.split,
            "image_column": self.image_column,
            "caption_column": self.caption_column,
            "label_column": self.label_column,
            "key_column": self.key_column,
            "fingerprint": self.fingerprint,
        }

    def _image(self, value: Any) -> Any:
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            value = value["bytes"] if value.get("bytes") is not None else value.get("path")
        if isinstance(value, str) and not os.path.isabs(value):
            value = os.path.join(self.image_root, value)
        return value

    def iter_range(
        self, start: int, end: int, skips: SkipCounter, rows: int = 256
    ) -> Iterator[tuple[int, RawSample]]:
        for a in range(start, end, rows):
            block = self.dataset[a : min(a + rows, end)]  # dict of column -> list
            for j in range(len(block[self.image_column])):
                i = a + j
                label = block[self.label_column][j] if self.label_column else None
                key = block[self.key_column][j] if self.key_column else i
                yield (
                    i,
                    RawSample(
                        key=str(key),
                        image=self._image(block[self.image_column][j]),
                        captions=block[self.caption_column][j] if self.caption_column else None,
                        label=int(label) if isinstance(label, (int, np.integer)) else None,
                    ),
                )


class TextFileSource:
    """A UTF-8 text file, one text per line; the id is the line number (1-based). Empty lines are skipped."""

    kind = "text"
    modality = "text"
    has_captions = True
    has_labels = False

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).resolve()
        data = self.path.read_bytes()
        self.lines = data.decode("utf-8", errors="surrogateescape").splitlines()
        self.fingerprint = _digest(data)

    def __len__(self) -> int:
        return len(self.lines)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "fingerprint": self.fingerprint}

    def iter_range(self, start: int, end: int, skips: SkipCounter) -> Iterator[tuple[int, RawSample]]:
        for i in range(start, end):
            yield i, RawSample(str(i + 1), None, self.lines[i], None)


SOURCE_KINDS: dict[str, Callable[..., Any]] = {
    "images": ImageFolderSource,
    "shards": ShardsSource,
    "hf": HFDiskSource,
    "text": TextFileSource,
}


def build_source(kind: str, path: Any, **options: Any) -> EmbedSource:
    """A source from a recipe's ``source`` node; options that are ``None`` take the kind's default.

    Raises:
        ValueError: unknown kind, or an option the kind does not take.
    """
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}; known: {sorted(SOURCE_KINDS)}")
    if path is None:
        raise ValueError("the source needs a path (source.path=...)")
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return SOURCE_KINDS[kind](path, **options)
    except TypeError as err:
        import inspect

        known = [p for p in inspect.signature(SOURCE_KINDS[kind]).parameters if p != "path"]
        raise ValueError(
            f"source kind {kind!r} takes options {known}, got {sorted(options)} ({err})"
        ) from None


@dataclass
class EmbedBatch:
    """Up to ``batch_size`` usable samples of one output shard, ready for the model.

    Attributes:
        shard: output shard index.
        last: the shard's last batch (the shard is complete once it is embedded).
        inputs: images ``(B, 3, H, W)`` float32, or token ids ``(B, L)`` int64.
        index: ``(B,)`` int64 positions in the source.
        ids: sample ids.
        captions: all captions per sample (``None`` entries where a sample has none), or None for sources
            without captions.
        labels: class ids (``None`` where unknown), or None for sources without labels.
        skipped: samples skipped since the previous batch of this worker, by reason.
        seen: samples of the source this batch accounts for (used + skipped), for progress.
    """

    shard: int
    last: bool
    inputs: torch.Tensor
    index: torch.Tensor
    ids: list[str]
    captions: list[list[str] | None] | None = None
    labels: list[int | None] | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    seen: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> EmbedBatch:
        """Called by a DataLoader with ``pin_memory=True``: pins the model inputs."""
        self.inputs = self.inputs.pin_memory()
        return self


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding and resizing are per-sample; leave the cores to the model


class EmbedDataset(IterableDataset):
    """Batches of the given output shards; each DataLoader worker takes whole shards (``j % workers``).

    Args:
        source: the corpus.
        shards: output shard indices to produce, in order.
        shard_size: samples per output shard.
        batch_size: usable samples per batch.
        transform: image transform (image sources).
        tokenizer: ``list[str] -> LongTensor (T, L)`` (text sources).
        max_pixels: decompression-bomb ceiling.
    """

    def __init__(
        self,
        source: EmbedSource,
        shards: Sequence[int],
        shard_size: int,
        batch_size: int,
        transform: Callable[[Any], torch.Tensor] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if source.modality == "image" and transform is None:
            raise ValueError("an image source needs an image transform")
        if source.modality == "text" and tokenizer is None:
            raise ValueError("a text source needs a tokenizer")
        self.source, self.shards = source, list(shards)
        self.shard_size, self.batch_size = int(shard_size), int(batch_size)
        self.transform, self.tokenizer, self.max_pixels = transform, tokenizer, max_pixels

    def __iter__(self) -> Iterator[EmbedBatch]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        skips = SkipCounter()
        n = len(self.source)
        for shard in mine:
            start, end = shard_bounds(shard, self.shard_size, n)
            pending: list[tuple[int, RawSample, Any]] = []
            seen = total = 0  # positions accounted for since the last batch / in this shard
            for pos, raw in self.source.iter_range(start, end, skips):
                total += 1
                item = self._prepare(raw, skips)
                if item is None:
                    seen += 1
                    continue
                if len(pending) == self.batch_size:
                    yield self._batch(shard, False, pending, skips, seen)
                    pending, seen = [], 0
                pending.append((pos, raw, item))
                seen += 1
            # positions a damaged tar never yielded count as seen too (``skips`` holds the reason)
            yield self._batch(shard, True, pending, skips, seen + (end - start - total))

    def _prepare(self, raw: RawSample, skips: SkipCounter) -> Any:
        try:
            if raw.skip is not None:  # e.g. a duplicate key in a shard
                raise SkipSample(raw.skip)
            if self.source.modality == "text":
                return decode_caption(raw.captions)
            img = _decode_image(raw.image, max_pixels=self.max_pixels)
            try:
                return self.transform(img)  # type: ignore[misc]  # (3, H, W) or a NaFlexSample
            except Exception as err:
                raise SkipSample("decode_error", f"transform failed: {type(err).__name__}: {err}") from None
        except SkipSample as skip:
            skips.skip(skip.reason, raw.key, skip.detail)
            return None

    def _batch(
        self, shard: int, last: bool, items: list[tuple[int, RawSample, Any]], skips: SkipCounter, seen: int
    ) -> EmbedBatch:
        if self.source.modality == "text":
            texts = [it[2] for it in items]
            inputs = self.tokenizer(texts) if texts else torch.zeros(0, 1, dtype=torch.long)  # type: ignore[misc]  # (B, L)
            captions: list[list[str] | None] | None = [[t] for t in texts]
        else:
            if items and not isinstance(items[0][2], torch.Tensor):  # a NaFlex tower's samples
                from mmclip.data.naflex import collate_images

                inputs = collate_images([it[2] for it in items])  # NaFlexImages
            elif items:  # numpy stack: one thread, no torch intra-op stalls in workers
                inputs = torch.from_numpy(np.stack([it[2].numpy() for it in items]))  # (B, 3, H, W)
            else:
                inputs = torch.zeros(0, 3, 1, 1)
            captions = [_captions(it[1].captions) for it in items] if self.source.has_captions else None
        labels = None
        if self.source.has_labels:
            labels = [None if it[1].label is None else int(it[1].label) for it in items]
        return EmbedBatch(
            shard=shard,
            last=last,
            inputs=inputs,
            index=torch.tensor([it[0] for it in items], dtype=torch.long),  # (B,)
            ids=[str(it[1].key) for it in items],
            captions=captions,
            labels=labels,
            skipped=skips.take(),
            seen=seen,
        )


def _captions(raw: Any) -> list[str] | None:
    """A sample's captions for the ids table; a missing or broken caption does not skip an image."""
    if raw is None:
        return None
    try:
        return decode_captions(raw)
    except SkipSample:
        return None


def make_loader(
    dataset: EmbedDataset, num_workers: int, pin_memory: bool = False, prefetch_factor: int | None = None
) -> torch.utils.data.DataLoader:
    """The DataLoader of an :class:`EmbedDataset` (workers never outnumber its shards)."""
    workers = max(0, min(int(num_workers), len(dataset.shards)))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=prefetch_factor if workers else None,
    )
