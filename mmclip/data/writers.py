"""Write image-caption samples as webdataset shards, a Hugging Face dataset, or image files + CSV.

The writers take an iterable of :class:`mmclip.data.collate.RawSample` whose ``image`` is a ``PIL.Image``
(encoded here) or already encoded bytes (written as they are, e.g. to build a corpus of bad files), whose
``captions`` is a list of strings (or raw bytes / ``None``), and whose ``label`` is a class id or ``None``.
They are what :mod:`mmclip.data.synthetic` uses to put its data set on disk, and what the tests use to
write bad-input corpora.

Layouts:

* webdataset: ``{prefix}-000000.tar, ...`` with members ``{key}.{png|jpg}``, ``{key}.txt`` (the first
  caption) and ``{key}.json`` (``{"captions": [...], "label": int}``), plus ``sizes.json`` (samples per
  shard, the format open_clip reads);
* Hugging Face: ``datasets.Dataset.save_to_disk(out_dir/{split})`` with a ``dataset_dict.json`` listing the
  splits (so ``datasets.load_from_disk(out_dir)`` gives a ``DatasetDict``), or ``out_dir/{split}.parquet``;
  columns ``key``, ``image``, ``caption``, ``captions``, ``label``;
* CSV: images under ``out_dir/{split}/`` and ``out_dir/{split}.csv`` (or ``.tsv``) with columns
  ``filepath`` (relative to the CSV), ``caption`` and ``label``, one row per caption.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable
from typing import Any

from PIL import Image

from mmclip.data.collate import RawSample


def _update_json(path: str, update: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrites the JSON object at ``path`` (empty if absent) as ``update(old)`` (index files that grow by split)."""
    old: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    with open(path, "w") as f:
        json.dump(update(old), f, indent=1, sort_keys=True)


__all__ = ["encode_image", "write_csv_files", "write_hf_dataset", "write_shards"]

_EXT = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}


def encode_image(img: Image.Image, image_format: str = "png", quality: int = 95) -> bytes:
    """Encode ``img`` as PNG (fast, lossless) or JPEG/WebP at ``quality``."""
    buf = io.BytesIO()
    fmt = image_format.lower()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"image_format must be one of {sorted(_EXT)}, got {image_format!r}")
    return buf.getvalue()


def _image_bytes(sample: RawSample, image_format: str) -> bytes | None:
    if sample.image is None:
        return None
    if isinstance(sample.image, Image.Image):
        return encode_image(sample.image, image_format)
    return bytes(sample.image)


def _caption_list(captions: Any) -> list[str] | None:
    if isinstance(captions, str):
        return [captions]
    if isinstance(captions, (list, tuple)) and all(isinstance(c, str) for c in captions):
        return list(captions)
    return None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))  # mtime 0, no owner: byte-identical shards on every run


def write_shards(
    samples: Iterable[RawSample],
    out_dir: str | os.PathLike[str],
    prefix: str = "train",
    shard_size: int = 1000,
    image_format: str = "png",
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write webdataset shards (see the module docstring). Returns the shard paths, in order."""
    os.makedirs(out_dir, exist_ok=True)
    ext = _EXT[image_format.lower()]
    paths: list[str] = []
    sizes: dict[str, int] = {}
    tar: tarfile.TarFile | None = None
    count = 0
    for sample in samples:
        if tar is None or count == shard_size:
            if tar is not None:
                tar.close()
            paths.append(os.path.join(os.fspath(out_dir), f"{prefix}-{len(paths):06d}.tar"))
            tar, count = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT), 0
        image = _image_bytes(sample, image_format)
        if image is not None:
            _add(tar, f"{sample.key}.{ext}", image)
        captions = _caption_list(sample.captions)
        if captions is not None:
            _add(tar, f"{sample.key}.txt", (captions[0] if captions else "").encode())
            meta = {"captions": captions, "label": -1 if sample.label is None else int(sample.label)}
            _add(tar, f"{sample.key}.json", json.dumps(meta).encode())
        elif isinstance(sample.captions, (bytes, bytearray)):
            _add(tar, f"{sample.key}.txt", bytes(sample.captions))
        count += 1
        sizes[os.path.basename(paths[-1])] = count
        if progress is not None:
            progress(1)
    if tar is not None:
        tar.close()
    _update_json(os.path.join(os.fspath(out_dir), "sizes.json"), lambda old: {**old, **sizes})
    return paths


def write_hf_dataset(
    samples: Iterable[RawSample],
    out_dir: str | os.PathLike[str],
    split: str = "train",
    file_format: str = "arrow",
    image_format: str = "png",
    progress: Callable[[int], None] | None = None,
) -> str:
    """Write a Hugging Face dataset split (see the module docstring). Returns the split's path."""
    import datasets

    rows: dict[str, list[Any]] = {"key": [], "image": [], "caption": [], "captions": [], "label": []}
    for sample in samples:
        captions = _caption_list(sample.captions)
        rows["key"].append(sample.key)
        image = _image_bytes(sample, image_format)
        rows["image"].append(None if image is None else {"bytes": image, "path": None})
        rows["caption"].append(captions[0] if captions else None)
        rows["captions"].append(captions)
        rows["label"].append(-1 if sample.label is None else int(sample.label))
        if progress is not None:
            progress(1)
    features = datasets.Features(
        key=datasets.Value("string"),
        image=datasets.Image(),
        caption=datasets.Value("string"),
        captions=datasets.Sequence(datasets.Value("string")),
        label=datasets.Value("int64"),
    )
    if file_format not in ("arrow", "parquet"):
        raise ValueError(f"file_format must be 'arrow' or 'parquet', got {file_format!r}")
    ds = datasets.Dataset.from_dict(rows, features=features)
    os.makedirs(out_dir, exist_ok=True)
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # the caller reports progress
    try:
        if file_format == "parquet":
            path = os.path.join(os.fspath(out_dir), f"{split}.parquet")
            ds.to_parquet(path)
            return path
        path = os.path.join(os.fspath(out_dir), split)
        ds.save_to_disk(path)
    finally:
        if not bars_were_off:
            datasets.utils.enable_progress_bars()
    _update_json(
        os.path.join(os.fspath(out_dir), "dataset_dict.json"),
        lambda old: {"splits": sorted({*old.get("splits", []), split})},
    )
    return path


def write_csv_files(
    samples: Iterable[RawSample],
    out_dir: str | os.PathLike[str],
    split: str = "train",
    sep: str = ",",
    image_format: str = "png",
    progress: Callable[[int], None] | None = None,
) -> str:
    """Write image files and a CSV/TSV index (see the module docstring). Returns the CSV's path."""
    ext = _EXT[image_format.lower()]
    image_dir = os.path.join(os.fspath(out_dir), split)
    os.makedirs(image_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), f"{split}.{'tsv' if sep == chr(9) else 'csv'}")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(["filepath", "caption", "label"])
        for sample in samples:
            rel = f"{split}/{sample.key}.{ext}"
            image = _image_bytes(sample, image_format)
            if image is not None:
                with open(os.path.join(os.fspath(out_dir), rel), "wb") as img_file:
                    img_file.write(image)
            label = -1 if sample.label is None else int(sample.label)
            for caption in _caption_list(sample.captions) or [""]:
                writer.writerow([rel, caption, label])
            if progress is not None:
                progress(1)
    return path
