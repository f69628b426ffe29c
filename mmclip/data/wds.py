"""Webdataset shards: tar files whose members ``{key}.{ext}`` group into samples by key.

Shard lists are brace patterns (``"data/train-{000000..000099}.tar"``), ``::``-separated lists of them, or
Python lists; each pattern is one *source* (several sources can be mixed by weight in resampled mode).
Local paths, ``file://``, ``pipe:<command>`` (read the command's stdout, e.g. ``pipe:aws s3 cp s3://... -``)
and any URL ``fsspec`` can open (``https://``, ``s3://``, ...) are accepted.

A sample takes its image from the first present of ``image_keys``, its captions from ``{key}.json``'s
``"captions"`` list if there is one, else from the first present of ``caption_keys``, and its label from
``json["label"]`` or ``{key}.cls``. The number of samples per shard comes from a ``sizes.json`` next to the
shards (``{"shard.tar": count}``, as open_clip reads it), else from scanning local tar headers, else it
must be declared with ``epoch_length``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import IO, Any

import braceexpand

from mmclip.data.base import ImageTextDataModule
from mmclip.data.collate import RawSample
from mmclip.data.quality import SkipCounter

__all__ = ["IMAGE_KEYS", "ShardSource", "WebDatasetDataModule", "expand_urls", "iter_tar", "shard_size"]

logger = logging.getLogger(__name__)

ShardSpec = str | Sequence[str] | None

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
"""Default image extensions of a sample, in order of preference."""


def expand_urls(spec: str | Sequence[str]) -> list[list[str]]:
    """Expand a shard spec into one list of URLs per source.

    ``"a-{0..3}.tar"`` is one source; ``"a-{0..3}.tar::b-{0..1}.tar"`` and ``["a-{0..3}.tar", "b.tar"]`` are
    two.
    """
    patterns = spec.split("::") if isinstance(spec, str) else list(spec)
    sources = [list(braceexpand.braceexpand(p.strip())) for p in patterns if p.strip()]
    if not sources:
        raise ValueError(f"no shards in {spec!r}")
    return sources


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://") :]
    if "://" in url or url.startswith("pipe:"):
        return None
    return url


def _open(url: str) -> IO[bytes]:
    path = _local_path(url)
    if path is not None:
        return open(path, "rb", buffering=1 << 20)
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        assert proc.stdout is not None
        return proc.stdout
    import fsspec

    return fsspec.open(url, "rb").open()


def _split_name(name: str) -> tuple[str, str]:
    """Member name -> (key, extension): the key ends at the first dot of the base name (webdataset rule)."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class _Counting:
    """A read-only file wrapper that counts the bytes read through it."""

    def __init__(self, f: IO[bytes]):
        self.f, self.n = f, 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.n += len(data)
        return data

    def close(self) -> None:
        pass


class _NoSkips:
    def skip(self, reason: str, key: str, detail: str = "") -> None:
        pass


def _ignored(key: str, ext: str) -> bool:
    return not ext or os.path.basename(key).startswith((".", "__"))


def iter_tar(url: str, skips: SkipCounter | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard as dicts ``{"__key__": key, ext: bytes, ...}``, in file order.

    Consecutive members with the same key form a sample; a key that comes back later in the shard (or an
    extension repeated within a sample) starts a sample marked ``"__duplicate__": True`` (skipped as
    ``duplicate_key`` by :class:`ShardSource`). A shard that cannot be opened or read to its end (damaged
    data, a truncated tail, a missing end-of-archive block) is reported to ``skips`` as ``corrupt_shard``;
    the samples before the damage are still yielded, each with only its fully read members.
    """
    sample: dict[str, Any] = {}
    seen: set[str] = set()

    def start(key: str) -> dict[str, Any]:
        new: dict[str, Any] = {"__key__": key, "__url__": url}
        if key in seen:
            new["__duplicate__"] = True
        seen.add(key)
        return new

    try:
        with _open(url) as raw:
            counted = _Counting(raw)
            with tarfile.open(fileobj=counted, mode="r|*") as tar:  # type: ignore[call-overload]
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_name(member.name)
                    if _ignored(key, ext):
                        continue
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if sample and (sample["__key__"] != key or ext in sample):
                        yield sample
                        sample = {}
                    if not sample:
                        sample = start(key)
                    sample[ext] = data
                plain = getattr(tar.fileobj, "comptype", "tar") == "tar"
                end = tar.offset
            while counted.read(1 << 16):  # the rest: end-of-archive blocks and padding
                pass
            if plain and counted.n < end + tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive block after {end} bytes (truncated)")
    except (OSError, tarfile.TarError, EOFError, zlib.error) as err:
        if skips is not None:
            skips.skip("corrupt_shard", url, f"{type(err).__name__}: {err}")
        else:
            raise
    if sample:
        yield sample


@lru_cache(maxsize=256)
def _sizes_json(directory: str) -> dict[str, int]:
    path = os.path.join(directory, "sizes.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {k: int(v) for k, v in json.load(f).items()}


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


@lru_cache(maxsize=65536)
def _count_local(path: str, mtime: float) -> int:
    """Samples :func:`iter_tar` yields from a local shard, from its headers only (plain tar: seeking over the
    member data; a damaged tail ends the count where reading would end); compressed shards are read."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(_COMPRESSED_MAGIC):
        return sum(1 for _ in iter_tar(path, _NoSkips()))  # type: ignore[arg-type]
    size = os.path.getsize(path)
    count, key_now, exts = 0, None, set()
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    break  # the member's data is cut off
                key, ext = _split_name(member.name)
                if _ignored(key, ext):
                    continue
                if key != key_now or ext in exts:
                    count, key_now, exts = count + 1, key, set()
                exts.add(ext)
    except (OSError, tarfile.TarError, EOFError):
        pass  # the damaged tail holds no more readable samples
    return count


def shard_size(url: str) -> int | None:
    """Samples in one shard from ``sizes.json`` or by scanning a local tar (a damaged one counts the samples
    before the damage); ``None`` if unknown (not a local file, or missing)."""
    path = _local_path(url)
    if path is None:
        return None
    known = _sizes_json(os.path.dirname(os.path.abspath(path)))
    if os.path.basename(path) in known:
        return known[os.path.basename(path)]
    try:
        return _count_local(path, os.path.getmtime(path))
    except OSError:
        return None


class ShardSource:
    """Webdataset shards as a stream source (see :mod:`mmclip.data.stream`).

    Args:
        spec: shard spec (see :func:`expand_urls`).
        image_keys: image extensions, in order of preference.
        caption_keys: caption extensions, in order of preference (after ``json["captions"]``).
        json_key: extension of the per-sample JSON (``"captions"``, ``"caption"``, ``"label"``).
        label_key: extension holding a class id as text.
    """

    def __init__(
        self,
        spec: str | Sequence[str],
        image_keys: Sequence[str] = IMAGE_KEYS,
        caption_keys: Sequence[str] = ("txt", "text", "caption"),
        json_key: str = "json",
        label_key: str = "cls",
    ):
        self.sources = expand_urls(spec)
        self.shards = [u for urls in self.sources for u in urls]
        self.source_of = [i for i, urls in enumerate(self.sources) for _ in urls]
        self.image_keys = tuple(image_keys)
        self.caption_keys = tuple(caption_keys)
        self.json_key = json_key
        self.label_key = label_key

    def shard_sizes(self) -> list[int | None]:
        """Samples per shard (``None`` where unknown)."""
        return [shard_size(url) for url in self.shards]

    def num_samples(self) -> int | None:
        sizes = self.shard_sizes()
        return None if any(n is None for n in sizes) else sum(sizes)  # type: ignore[arg-type]

    def to_raw(self, sample: dict[str, Any]) -> RawSample:
        """Map a tar sample dict onto a :class:`RawSample` (a duplicate key is a ``duplicate_key`` skip)."""
        key = sample["__key__"]
        if sample.get("__duplicate__"):
            return RawSample(key, None, None, skip="duplicate_key")
        image = next((sample[k] for k in self.image_keys if k in sample), None)
        captions: Any = next((sample[k] for k in self.caption_keys if k in sample), None)
        label = None
        meta = sample.get(self.json_key)
        if meta is not None:
            try:
                info = json.loads(meta)
            except (ValueError, UnicodeDecodeError):
                info = None
            if isinstance(info, dict):
                if isinstance(info.get("captions"), list):
                    captions = info["captions"]
                elif captions is None and "caption" in info:
                    captions = info["caption"]
                if isinstance(info.get("label"), int):
                    label = info["label"]
        if label is None and self.label_key in sample:
            try:
                label = int(sample[self.label_key])
            except ValueError:
                label = None
        return RawSample(key, image, captions, label)

    def iter_shard(self, index: int, skips: SkipCounter | None = None) -> Iterator[RawSample]:
        for sample in iter_tar(self.shards[index], skips):
            yield self.to_raw(sample)


class WebDatasetDataModule(ImageTextDataModule):
    """Image-text data in webdataset shards.

    Args:
        train_shards: training shard spec (one or more sources, see :func:`expand_urls`).
        val_shards: validation shard spec (retrieval), or ``None``.
        test_shards: test shard spec, or ``None``.
        train_weights: per-source sampling weights (resampled mode only).
        epoch_length: training samples per epoch over all ranks; default: the shards' size (``sizes.json``
            or local scan). Required in resampled mode unless the size is known.
        resampled: draw shards with replacement (independent streams per worker, for large multi-node runs).
        shuffle_buffer: samples per worker in the shuffle buffer (raw bytes are buffered).
        has_labels: the shards carry labels (``json["label"]`` or ``.cls``) for ``classification_dataloader``.
        image_keys, caption_keys, json_key, label_key: see :class:`ShardSource`.
        **kwargs: :class:`ImageTextDataModule` options.
    """

    def __init__(
        self,
        train_shards: ShardSpec = None,
        val_shards: ShardSpec = None,
        test_shards: ShardSpec = None,
        train_weights: Sequence[float] | None = None,
        epoch_length: int | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        has_labels: bool = False,
        image_keys: Sequence[str] = IMAGE_KEYS,
        caption_keys: Sequence[str] = ("txt", "text", "caption"),
        json_key: str = "json",
        label_key: str = "cls",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.specs = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.keys = dict(
            image_keys=image_keys, caption_keys=caption_keys, json_key=json_key, label_key=label_key
        )
        if train_weights is not None:
            if not resampled:
                raise ValueError(
                    "train_weights need resampled=True (weighted mixing draws shards with replacement)"
                )
            n_sources = len(expand_urls(train_shards)) if train_shards is not None else 0
            if len(train_weights) != n_sources:
                raise ValueError(
                    f"train_weights has {len(train_weights)} entries for {n_sources} training sources"
                )
        self.train_weights = list(train_weights) if train_weights is not None else None
        self.epoch_length = epoch_length
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.has_labels = has_labels

    def _source(self, split: str) -> ShardSource | None:
        spec = self.specs.get(split)
        return None if spec is None else ShardSource(spec, **self.keys)  # type: ignore[arg-type]

    def _has_labels(self, split: str) -> bool:
        return self.has_labels and self.specs.get(split) is not None

    def _stream_options(self) -> dict[str, Any]:
        return {
            "shuffle_buffer": self.shuffle_buffer,
            "resampled": self.resampled,
            "weights": self.train_weights,
        }

    def _stream_num_batches(self, source: Any, world_size: int) -> int | None:
        if self.epoch_length is not None:
            return self.epoch_length // (world_size * self.batch_size)
        return super()._stream_num_batches(source, world_size)
