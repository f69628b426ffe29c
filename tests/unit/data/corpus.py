"""Builders of small image files, broken in every way the data layer must tolerate."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from mmclip.data.collate import RawSample


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_image(size: int = 48, seed: int = 0) -> Image.Image:
    """An RGB image of noise (JPEG scan data dominates the file, so truncation hits pixel data)."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def forged_png(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("L", (4, 4))))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    return bytes(data[:12]) + ihdr + struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF) + bytes(data[33:])


def corrupt_png() -> bytes:
    """A PNG whose header checksum is wrong."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (1, 2, 3))))
    data[20] ^= 0xFF
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(noise_image(64), "JPEG", quality=90)
    return data[: int(len(data) * 0.6)]


def exif_rotated_jpeg() -> bytes:
    """20 x 10 JPEG, left half red, right half blue, with EXIF orientation 6 (display rotated 90 deg CW)."""
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    img.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def convertible_images() -> dict[str, bytes]:
    """Images in awkward modes that must be converted, not skipped."""
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((10, 20, 30, 255), (0, 0, 4, 8))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))
    gray16 = Image.fromarray(np.array([[0, 32768, 65535, 1000]] * 4, dtype=np.uint16))
    return {
        "cmyk": encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95),
        "rgba": encode(rgba),
        "palette_alpha": encode(palette, transparency=0),
        "la": encode(Image.new("LA", (8, 8), (100, 255))),
        "gray16": encode(gray16),
        "bilevel": encode(Image.new("1", (8, 8), 1)),
        "gray_jpeg": encode(Image.new("L", (8, 8), 77), "JPEG"),
        "exif_rotated": exif_rotated_jpeg(),
    }


def bad_corpus(with_bad_encoding: bool = True) -> list[tuple[RawSample, str | None]]:
    """Samples and the skip reason each must get (``None``: usable)."""
    good = encode(noise_image(24), "JPEG")
    items: list[tuple[RawSample, str | None]] = [
        (RawSample("good0", good, ["a good sample"], 1), None),
        (RawSample("good1", encode(Image.new("RGB", (30, 20), (5, 6, 7))), ["another", "good one"], 2), None),
        (RawSample("corrupt", corrupt_png(), ["corrupt"]), "corrupt_image"),
        (RawSample("truncated", truncated_jpeg(), ["truncated"]), "truncated_image"),
        (RawSample("empty", b"", ["zero bytes"]), "empty_file"),
        (RawSample("text", b"this is not an image at all", ["text file"]), "not_an_image"),
        (RawSample("bomb", forged_png(30000, 30000), ["huge"]), "too_large"),
        (RawSample("bomb2", forged_png(10000, 10000), ["large"]), "too_large"),
        (RawSample("nocaption", good, None), "missing_caption"),
        (RawSample("blank", good, ["   "]), "empty_caption"),
        (RawSample("noimage", None, ["no image"]), "missing_image"),
    ]
    if with_bad_encoding:
        items.append((RawSample("latin1", good, b"caf\xe9 \xff bytes"), "bad_caption_encoding"))
    for name, data in convertible_images().items():
        items.append((RawSample(f"conv-{name}", data, [f"a {name} image"]), None))
    return items


def expected_counts(items: list[tuple[RawSample, str | None]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, reason in items:
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts
