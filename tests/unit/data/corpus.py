"""Builders of small image files, broken in every way the data layer must tolerate."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from typing import Any

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


# ------------------------------------------------------------------ a hostile corpus for whole data modules
def strip_png(width: int, height: int) -> bytes:
    """A gray PNG of ``width`` x ``height`` (a 600000 x 2 strip is about 1.2 KB)."""
    return encode(Image.new("L", (width, height), 128))


def gif_image() -> bytes:
    img = Image.new("P", (12, 10), 0)
    img.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    img.paste(1, (0, 0, 6, 10))
    return encode(img, "GIF")


def hostile_corpus(n_good: int = 24, bytes_captions: bool = True) -> list[tuple[RawSample, str | None]]:
    """Good samples with every kind of damage spread between them, and the skip reason of each.

    ``None`` means usable (after conversion: CMYK, 16-bit, palette with transparency, EXIF rotation, GIF,
    WebP, a 20000 x 2 strip, a 100 KB caption, a caption with a NUL inside).
    """
    conv = convertible_images()
    odd: list[tuple[str, Any, Any, str | None]] = [
        ("truncated", truncated_jpeg(), "truncated", "truncated_image"),
        ("zero", b"", "zero bytes", "empty_file"),
        ("textjpg", b"this is text, named .jpg", "text", "not_an_image"),
        ("bomb", forged_png(30000, 30000), "bomb", "too_large"),
        ("corrupt", corrupt_png(), "corrupt", "corrupt_image"),
        ("strip", strip_png(20000, 2), "a long gray strip", None),
        ("cmyk", conv["cmyk"], "cmyk", None),
        ("gray16", conv["gray16"], "16 bit", None),
        ("palette", conv["palette_alpha"], "palette with transparency", None),
        ("exif", conv["exif_rotated"], "rotated", None),
        ("gif", gif_image(), "a gif", None),
        ("webp", encode(noise_image(16, 3), "WEBP"), "a webp", None),
        ("capempty", None, "", "empty_caption"),
        ("capspace", None, " \t  ", "empty_caption"),
        ("capnul", None, "\x00\x00", "empty_caption"),
        ("capnulin", None, "a\x00cat", None),
        ("caphuge", None, "word " * 20000, None),
        ("capmissing", None, None, "missing_caption"),
    ]
    if bytes_captions:
        odd.append(("caplatin1", None, b"caf\xe9 \xff", "bad_caption_encoding"))
    items: list[tuple[RawSample, str | None]] = []
    for i in range(max(n_good, len(odd))):
        if i < n_good:
            items.append((RawSample(f"good{i:03d}", encode(noise_image(20, i)), [f"good sample {i}"]), None))
        if i < len(odd):
            name, image, caption, reason = odd[i]
            image = encode(noise_image(20, 100 + i)) if image is None else image
            items.append((RawSample(f"odd-{name}", image, caption), reason))
    return items


def image_ext(data: bytes) -> str:
    """The member extension a writer would give these bytes (text becomes ``.jpg``, on purpose)."""
    if data.startswith(b"GIF8"):
        return "gif"
    if data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"\x89PNG"):
        return "png"
    return "jpg"


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A plain tar of ``(name, data)`` members, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(raw: RawSample) -> list[tuple[str, bytes]]:
    """Tar members of one sample: ``{key}.{ext}`` for the image, ``{key}.txt`` for the caption if any."""
    out = []
    if raw.image is not None:
        out.append((f"{raw.key}.{image_ext(raw.image)}", raw.image))
    cap = raw.captions
    if isinstance(cap, list):
        cap = cap[0]
    if cap is not None:
        out.append((f"{raw.key}.txt", cap if isinstance(cap, bytes) else cap.encode("utf-8")))
    return out
