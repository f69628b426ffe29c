"""Bad-input tolerance: decoding images and captions, skip reasons, and the skipped-fraction ceiling.

Real image-text corpora hold corrupt, truncated and empty files, files that are not images, decompression
bombs, captions that are missing, empty or not UTF-8, and images in every PIL mode. The data pipeline
converts what it can (see :func:`decode_image`) and skips the rest:

* Worker side, :class:`SkipCounter` counts skipped samples by reason and logs the first sample of each
  reason (with its key) once per process; each batch carries the counts since the previous batch of the
  same worker in ``ImageTextBatch.skipped``.
* Main-process side, :class:`SkipStats` sums those counts and raises :class:`DataQualityError` when the
  skipped fraction exceeds ``max_skip_fraction``, instead of silently training on garbage. The training
  loaders feed it themselves (:meth:`SkipStats.count`, for every batch they yield) and check the ceiling on
  skipped work before a batch is complete, so a corpus that is all bad fails within one pass over it.

Image conversions (everything ends as an 8-bit ``RGB`` image):

* EXIF orientation is applied (``ImageOps.exif_transpose``), so rotated phone photos come out upright.
* Images with transparency (``RGBA``, ``LA``, ``PA``, palette or ``L``/``RGB`` images with a transparency key)
  are composited on a white background.
* 16-bit and 32-bit integer images (``I;16*``, ``I``) are scaled from 0..65535 to 0..255 with rounding;
  float images (``F``) are scaled from 0..1 when their values lie there, else clipped to 0..255.
* ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` are converted with PIL's ``convert("RGB")``.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_CAPTION_CHARS",
    "SKIP_REASONS",
    "DataQualityError",
    "SkipCounter",
    "SkipSample",
    "SkipStats",
    "decode_caption",
    "decode_captions",
    "decode_image",
    "to_rgb",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Images with more pixels than this (read from the header, before decoding) are skipped as ``too_large``."""

MAX_CAPTION_CHARS = 4096
"""Captions are cut to this many characters (a text tower reads at most a few hundred tokens)."""

SKIP_REASONS: dict[str, str] = {
    "missing_image": "the sample has no image field",
    "missing_file": "the image file does not exist",
    "empty_file": "the image file or field is zero bytes",
    "not_an_image": "the bytes are not in any image format PIL knows",
    "corrupt_image": "the image header or data is damaged",
    "truncated_image": "the image data ends early",
    "too_large": "more pixels than max_pixels (decompression-bomb guard)",
    "decode_error": "converting or transforming the image failed unexpectedly",
    "missing_caption": "the sample has no caption",
    "empty_caption": "the caption is empty or whitespace only",
    "bad_caption_encoding": "the caption is not valid UTF-8",
    "corrupt_shard": "a shard could not be opened or read to its end (its remaining samples are lost)",
    "duplicate_key": "a shard holds a second sample with a key it already had",
    "malformed_row": "a CSV/TSV line is not one well-formed row with the header's number of fields",
}
"""Every reason a sample can be skipped for, with what it means."""

_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00")
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_EXIF_ORIENTATION = 0x0112
_LOGGED_REASONS: set[str] = set()  # per process: log the first skip of each reason only


class SkipSample(Exception):
    """Raised while preparing one sample that cannot be used; carries the skip ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {sorted(SKIP_REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DataQualityError(RuntimeError):
    """Too many samples were skipped: the data is broken or mis-configured."""


class SkipCounter:
    """Worker-side skip counts since the last :meth:`take`, logging the first skip of each reason.

    The first time a process skips a sample for a given reason it logs a warning naming the sample key and
    the error; later skips for that reason are only counted.
    """

    def __init__(self) -> None:
        self.pending: Counter[str] = Counter()

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        """Count one skipped sample (and log it if it is the first of its reason in this process)."""
        self.pending[reason] += 1
        if reason not in _LOGGED_REASONS:
            _LOGGED_REASONS.add(reason)
            logger.warning(
                "Skipping sample %r: %s (%s)%s. Later '%s' skips are counted, not logged; the training task "
                "logs the counts.",
                key,
                reason,
                SKIP_REASONS[reason],
                f": {detail}" if detail else "",
                reason,
            )

    def take(self) -> dict[str, int]:
        """The counts since the previous call, and reset them."""
        out = dict(self.pending)
        self.pending.clear()
        return out


class SkipStats:
    """Main-process totals of skipped and used samples, with a ceiling on the skipped fraction.

    The training loaders call :meth:`count` for every batch they yield; read the totals with
    :meth:`as_dict` (``data/skipped/<reason>``, ``data/skipped``, ``data/skip_fraction``) or ``counts``.

    Args:
        max_skip_fraction: the largest tolerated ``skipped / (skipped + used)``; above it :meth:`update`
            raises :class:`DataQualityError`. ``1.0`` disables the check.
        min_samples: the check only runs once this many samples (skipped + used) were seen, so a few bad
            samples at the start do not stop a run.
    """

    def __init__(self, max_skip_fraction: float = 0.1, min_samples: int = 200):
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.max_skip_fraction = float(max_skip_fraction)
        self.min_samples = int(min_samples)
        self.counts: Counter[str] = Counter()
        self.n_ok = 0
        self.fed_by_loader = False

    @property
    def total_skipped(self) -> int:
        """Skipped samples over all reasons."""
        return sum(self.counts.values())

    @property
    def fraction(self) -> float:
        """``skipped / (skipped + used)`` (0 before any sample)."""
        seen = self.total_skipped + self.n_ok
        return self.total_skipped / seen if seen else 0.0

    def count(self, skipped: Mapping[str, int], n_ok: int) -> None:
        """Add one batch's skip counts and its number of used samples, then check the ceiling.

        The training loaders call this for every batch they yield (the first call makes :meth:`update` a
        check only, so a task that still calls it does not count twice).

        Raises:
            DataQualityError: the skipped fraction exceeds ``max_skip_fraction`` after ``min_samples``.
        """
        self.fed_by_loader = True
        for reason, n in skipped.items():
            if n:
                self.counts[reason] += int(n)
        self.n_ok += int(n_ok)
        self.check()

    def update(self, skipped: Mapping[str, int], n_ok: int) -> None:
        """Like :meth:`count`, for callers that see the batches; only checks once a loader feeds the stats."""
        if self.fed_by_loader:
            self.check()
            return
        for reason, n in skipped.items():
            if n:
                self.counts[reason] += int(n)
        self.n_ok += int(n_ok)
        self.check()

    def check(self, pending: Mapping[str, int] | None = None) -> None:
        """Raise :class:`DataQualityError` if the ceiling is exceeded, counting ``pending`` skips too (skips of
        a batch still being filled)."""
        extra = sum(pending.values()) if pending else 0
        skipped = self.total_skipped + extra
        seen = skipped + self.n_ok
        if seen >= self.min_samples and skipped > self.max_skip_fraction * seen:
            raise DataQualityError(
                f"{skipped} of {seen} samples ({skipped / seen:.1%}) were skipped, above "
                f"max_skip_fraction={self.max_skip_fraction:g}. By reason: {self.summary(pending)}. Fix the data "
                "(the log names the first sample of each reason) or raise the data module's max_skip_fraction."
            )

    def nothing_usable(self, where: str, pending: Mapping[str, int] | None = None) -> DataQualityError:
        """The error for a pass over ``where`` that yielded no usable sample at all."""
        return DataQualityError(
            f"no usable sample in one pass over {where}: every sample was skipped. By reason: "
            f"{self.summary(pending)}. Fix the data (the log names the first sample of each reason)."
        )

    def summary(self, pending: Mapping[str, int] | None = None) -> str:
        """``"reason: count, ..."``, largest first (``pending`` counts added)."""
        counts = self.counts + Counter(pending or {})
        return ", ".join(f"{r}: {n}" for r, n in counts.most_common()) or "none"

    def as_dict(self, prefix: str = "data/") -> dict[str, float]:
        """Flat metrics for a logger: ``{prefix}skipped/<reason>``, ``{prefix}skipped``, ``{prefix}skip_fraction``."""
        out = {f"{prefix}skipped/{r}": float(n) for r, n in self.counts.items()}
        out[f"{prefix}skipped"] = float(self.total_skipped)
        out[f"{prefix}skip_fraction"] = self.fraction
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "n_ok": self.n_ok}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = Counter(state.get("counts", {}))
        self.n_ok = int(state.get("n_ok", 0))


def decode_caption(raw: Any) -> str:
    """A usable caption from ``raw`` (str or UTF-8 bytes): NUL characters removed, stripped, and cut to
    :data:`MAX_CAPTION_CHARS` (far more than any text tower reads; it bounds the tokenizer's work).

    Raises:
        SkipSample: ``missing_caption`` (None or not text), ``bad_caption_encoding`` (invalid UTF-8, or a
            string holding surrogate escapes), ``empty_caption``.
    """
    if raw is None:
        raise SkipSample("missing_caption")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise SkipSample("bad_caption_encoding", str(err)) from None
    if not isinstance(raw, str):
        raise SkipSample("missing_caption", f"caption is a {type(raw).__name__}")
    try:
        raw.encode("utf-8")  # lone surrogates come from files read with errors="surrogateescape"
    except UnicodeEncodeError as err:
        raise SkipSample("bad_caption_encoding", str(err)) from None
    text = raw.replace("\x00", "").strip()
    if not text:
        raise SkipSample("empty_caption")
    return text[:MAX_CAPTION_CHARS]


def decode_captions(raw: Any) -> list[str]:
    """All usable captions of a sample whose caption field is a string, bytes or a list of them.

    Unusable entries of a list are dropped; if none is left the reason of the first one is raised.

    Raises:
        SkipSample: no usable caption.
    """
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes, bytearray)):
        good, first_error = [], None
        for item in raw:
            try:
                good.append(decode_caption(item))
            except SkipSample as err:
                first_error = first_error or err
        if good:
            return good
        raise first_error or SkipSample("missing_caption", "empty caption list")
    return [decode_caption(raw)]


def _open_bytes(data: bytes, max_pixels: int) -> Image.Image:
    if len(data) == 0:
        raise SkipSample("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SkipSample("too_large", str(err)) from None
    except UnidentifiedImageError:
        reason = "corrupt_image" if data.startswith(_IMAGE_MAGIC) or data[8:12] == b"WEBP" else "not_an_image"
        raise SkipSample(reason, "PIL cannot identify the image") from None
    except Exception as err:  # PIL raises many types on damaged headers
        raise _damaged(err) from None
    if img.width * img.height > max_pixels:
        raise SkipSample("too_large", f"{img.width}x{img.height} > max_pixels={max_pixels}")
    return img


def _load(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except Exception as err:
        raise _damaged(err) from None
    return img


def _damaged(err: Exception) -> SkipSample:
    text = f"{type(err).__name__}: {err}"
    truncated = isinstance(err, EOFError) or "truncat" in text.lower()
    return SkipSample("truncated_image" if truncated else "corrupt_image", text)


def _exif_upright(img: Image.Image) -> Image.Image:
    if img.format is None or (img.format in ("JPEG", "MPO", "PNG", "WEBP") and not img.info.get("exif")):
        return img  # drawn in memory, or no EXIF block: nothing to read (getexif would only cost time)
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # damaged EXIF: keep the pixels as they are
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def _scale_to_uint8(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    else:  # 16-bit samples (I;16*, or I holding 0..65535): v * 255 / 65535, rounded
        wide = np.clip(arr.astype(np.int64), 0, 65535)
        out = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an 8-bit RGB image (transparency composited on white; see the module docstring)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _INT_MODES or mode == "F":
        return _scale_to_uint8(img).convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: Any,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode one image field into an upright, loaded 8-bit RGB ``PIL.Image``.

    Args:
        data: encoded bytes, a file path, or an already decoded ``PIL.Image``.
        max_pixels: pixel ceiling checked on the header before decoding (decompression-bomb guard).
        draft_size: ``(width, height)``; if given, JPEGs are decoded at the smallest power-of-two
            reduction still at least this large (much faster, slightly different pixels). ``None`` decodes
            at full size, as open_clip does.

    Raises:
        SkipSample: the image cannot be used; ``reason`` says why (see :data:`SKIP_REASONS`).
    """
    if data is None:
        raise SkipSample("missing_image")
    if isinstance(data, Image.Image):
        if data.width * data.height > max_pixels:
            raise SkipSample("too_large", f"{data.width}x{data.height} > max_pixels={max_pixels}")
        img = _load(data)
    else:
        if isinstance(data, (str, os.PathLike)):
            try:
                with open(data, "rb") as f:
                    data = f.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
                raise SkipSample("missing_file", str(err)) from None
        elif isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        elif not isinstance(data, bytes):
            raise SkipSample("not_an_image", f"image field is a {type(data).__name__}")
        img = _open_bytes(data, max_pixels)
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img = _load(img)
    try:
        return to_rgb(_exif_upright(img))
    except SkipSample:
        raise
    except Exception as err:
        raise SkipSample("decode_error", f"{type(err).__name__}: {err}") from None
