"""CSV / TSV files listing image paths and captions.

Each row names an image file (relative paths are resolved against ``image_root``, by default the CSV's
directory) and a caption; rows that name the same image are grouped into one sample with several captions
(a random one per training step, all of them for evaluation). The file is read as UTF-8 with invalid bytes
kept as surrogate escapes, so a caption that is not valid UTF-8 skips its row's sample
(``bad_caption_encoding``) instead of failing the whole file.

Parsing is strict: every line is one row (a quoted field cannot span lines, so write newlines in captions
as spaces) with exactly the header's number of fields. A line that is not (an unclosed quote, extra or
missing fields) is a ``malformed_row`` skip in its place in the data, logged with its line number; blank
lines are ignored.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from typing import Any

from mmclip.data.base import ImageTextDataModule
from mmclip.data.collate import RawSample

__all__ = ["CsvDataModule", "CsvSource"]

logger = logging.getLogger(__name__)


class CsvSource:
    """A CSV/TSV file as a map-style source (one sample per distinct image path).

    Args:
        path: the CSV (``,``) or TSV (``\\t``) file.
        image_column: column with image paths.
        caption_column: column with captions.
        label_column: column with integer class ids, or ``None``.
        sep: field separator; ``None`` picks ``\\t`` for ``.tsv`` / ``.tab`` files, else ``,``.
        image_root: directory for relative image paths (default: the CSV's directory).
        group_captions: merge rows with the same image into one sample (else one sample per row).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_column: str = "filepath",
        caption_column: str = "caption",
        label_column: str | None = None,
        sep: str | None = None,
        image_root: str | os.PathLike[str] | None = None,
        group_captions: bool = True,
    ):
        path = os.fspath(path)
        if sep is None:
            sep = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
        root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
        self.path = path
        images: list[str] = []
        captions: list[list[str | None]] = []
        labels: list[int | None] = []
        skips: list[str | None] = []
        where: dict[str, int] = {}
        malformed: list[int] = []
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            fields: list[str] = []
            for number, line in enumerate(f, start=1):
                if not line.strip("\r\n"):
                    continue  # blank lines are not rows
                row = _parse_line(line, sep)
                if not fields:
                    fields = row or []
                    missing = [
                        c
                        for c in (image_column, caption_column, label_column)
                        if c is not None and c not in fields
                    ]
                    if missing:
                        raise ValueError(
                            f"{path} has no column(s) {missing}; its columns are {fields} (separator {sep!r})"
                        )
                    continue
                if row is None or len(row) != len(fields):
                    malformed.append(number)  # a place in the order, skipped as malformed_row
                    images.append("")
                    captions.append([None])
                    labels.append(None)
                    skips.append(f"line {number}")
                    continue
                values = dict(zip(fields, row, strict=True))
                image = values[image_column]
                if image and not os.path.isabs(image):
                    image = os.path.join(root, image)
                caption = values[caption_column]
                label = _parse_label(values[label_column]) if label_column else None
                if group_captions and image and image in where:
                    captions[where[image]].append(caption)
                    continue
                if image:
                    where[image] = len(images)
                images.append(image)
                captions.append([caption])
                labels.append(label)
                skips.append(None)
        if malformed:
            shown = ", ".join(map(str, malformed[:20])) + (", ..." if len(malformed) > 20 else "")
            logger.warning(
                "%s: %d malformed line(s) (not one row of %d fields: unclosed quote, extra or missing fields), "
                "skipped as malformed_row: line %s",
                path,
                len(malformed),
                len(fields),
                shown,
            )
        self.malformed_lines = malformed
        self.skips = skips
        self.images, self.captions, self.labels = images, captions, labels

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int) -> RawSample:
        if self.skips[index] is not None:
            return RawSample(key=self.skips[index], image=None, captions=None, skip="malformed_row")
        image = self.images[index]
        return RawSample(
            key=os.path.relpath(image, os.path.dirname(os.path.abspath(self.path)))
            if image
            else f"row-{index}",
            image=image or None,
            captions=self.captions[index],
            label=self.labels[index],
        )

    def labelled_indices(self) -> list[int]:
        return [i for i, label in enumerate(self.labels) if label is not None and label >= 0]


def _parse_line(line: str, sep: str) -> list[str] | None:
    """The fields of one physical line, or ``None`` if it is not well-formed CSV on its own (e.g. a quote
    that does not close on the line: rows never span lines, so one bad quote cannot swallow the next rows)."""
    try:
        rows = list(csv.reader([line.rstrip("\r\n")], delimiter=sep, strict=True))
    except csv.Error:
        return None
    return rows[0] if len(rows) == 1 else None


def _parse_label(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


class CsvDataModule(ImageTextDataModule):
    """Image-text data listed in CSV / TSV files (see :class:`CsvSource`).

    Args:
        train_file: training CSV/TSV.
        val_file: validation CSV/TSV (retrieval), or ``None``.
        test_file: test CSV/TSV, or ``None``.
        image_column, caption_column, label_column, sep, image_root, group_captions: see :class:`CsvSource`.
        **kwargs: :class:`ImageTextDataModule` options.
    """

    def __init__(
        self,
        train_file: str | os.PathLike[str] | None = None,
        val_file: str | os.PathLike[str] | None = None,
        test_file: str | os.PathLike[str] | None = None,
        image_column: str = "filepath",
        caption_column: str = "caption",
        label_column: str | None = None,
        sep: str | None = None,
        image_root: str | os.PathLike[str] | None = None,
        group_captions: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.options: Mapping[str, Any] = dict(
            image_column=image_column,
            caption_column=caption_column,
            label_column=label_column,
            sep=sep,
            image_root=image_root,
            group_captions=group_captions,
        )
        self._sources: dict[str, CsvSource | None] = {}

    def _source(self, split: str) -> CsvSource | None:
        if split not in self._sources:
            path = self.files.get(split)
            self._sources[split] = None if path is None else CsvSource(path, **self.options)
        return self._sources[split]

    def _has_labels(self, split: str) -> bool:
        return self.options["label_column"] is not None and self.files.get(split) is not None

    def _labelled_indices(self, source: Any, split: str) -> list[int] | None:
        return source.labelled_indices()
