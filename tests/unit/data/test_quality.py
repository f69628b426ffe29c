"""Bad-input tolerance: every skip reason, every conversion, the skip counters and the ceiling."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from mmclip.data import quality
from mmclip.data.quality import (
    SKIP_REASONS,
    DataQualityError,
    SkipCounter,
    SkipSample,
    SkipStats,
    decode_caption,
    decode_captions,
    decode_image,
)
from tests.unit.data.corpus import bad_corpus, convertible_images, encode, forged_png, noise_image


def _reason(raw) -> str | None:
    try:
        decode_captions(raw.captions)
        decode_image(raw.image)
    except SkipSample as skip:
        return skip.reason
    return None


@pytest.mark.parametrize("raw,want", bad_corpus(), ids=lambda x: getattr(x, "key", str(x)))
def test_every_corpus_sample_gets_its_reason(raw, want):
    assert _reason(raw) == want


def test_missing_file_and_path_input(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(encode(Image.new("RGB", (5, 4), (9, 8, 7))))
    assert decode_image(str(path)).size == (5, 4)
    with pytest.raises(SkipSample) as err:
        decode_image(str(tmp_path / "absent.png"))
    assert err.value.reason == "missing_file"


def test_pixel_ceiling_is_checked_before_decoding():
    data = forged_png(3000, 3000)  # the pixel data behind this header is only 4x4: decoding would fail
    with pytest.raises(SkipSample) as err:
        decode_image(data, max_pixels=1000 * 1000)
    assert err.value.reason == "too_large" and "3000x3000" in err.value.detail
    assert decode_image(encode(Image.new("RGB", (40, 30))), max_pixels=1200).size == (40, 30)


def test_conversions_to_rgb():
    images = {name: np.asarray(decode_image(data)) for name, data in convertible_images().items()}
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in images.values())
    # alpha composited on white: transparent -> white, opaque keeps its colour
    assert images["rgba"][0, 0].tolist() == [10, 20, 30] and images["rgba"][0, 7].tolist() == [255, 255, 255]
    assert images["palette_alpha"][0, 0].tolist() == [200, 10, 10]
    assert images["palette_alpha"][0, 7].tolist() == [255, 255, 255]
    assert images["la"][0, 0].tolist() == [100, 100, 100]
    # 16-bit: v * 255 / 65535 rounded
    assert images["gray16"][0, :, 0].tolist() == [0, 128, 255, round(1000 * 255 / 65535)]
    assert np.abs(images["cmyk"].astype(int) - [255, 0, 0]).max() <= 3
    assert images["bilevel"].min() == 255 and images["gray_jpeg"][0, 0].tolist() == [77, 77, 77]


def test_exif_orientation_applied():
    img = decode_image(convertible_images()["exif_rotated"])
    assert img.size == (10, 20)  # 20 x 10 stored, rotated 90 degrees for display
    arr = np.asarray(img).astype(int)
    assert arr[2, 5, 0] > 200 and arr[2, 5, 2] < 60  # left (red) half is now on top
    assert arr[17, 5, 2] > 200 and arr[17, 5, 0] < 60


def test_float_and_int32_images():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(decode_image(f))[0, :, 0].tolist() == [0, 128, 255]
    i32 = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32), mode="I")
    assert np.asarray(decode_image(i32))[0, :, 0].tolist() == [0, 255, 255, 0]


def test_decoded_pixels_match_plain_pil():
    data = encode(noise_image(32), "JPEG", quality=85)
    ref = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(data)), ref)


def test_draft_decodes_reduced_jpeg():
    data = encode(noise_image(256), "JPEG")
    assert decode_image(data, draft_size=(100, 100)).size == (128, 128)
    assert decode_image(data, draft_size=(200, 200)).size == (256, 256)


def test_captions():
    assert decode_caption(b"  caf\xc3\xa9  ") == "café"
    assert decode_captions(["", "ok", None, b"\xff"]) == ["ok"]
    for raw, reason in [
        (None, "missing_caption"),
        (3.5, "missing_caption"),
        ("  \n", "empty_caption"),
        (b"\xff\xfe", "bad_caption_encoding"),
        ("bad \udcff surrogate", "bad_caption_encoding"),
        ([], "missing_caption"),
        (["", "  "], "empty_caption"),
    ]:
        with pytest.raises(SkipSample) as err:
            decode_captions(raw)
        assert err.value.reason == reason, raw


def test_unknown_reason_rejected():
    with pytest.raises(ValueError, match="unknown skip reason"):
        SkipSample("weird")


def test_skip_counter_logs_once_per_reason(caplog, monkeypatch):
    monkeypatch.setattr(quality, "_LOGGED_REASONS", set())
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="mmclip.data.quality"):
        counter.skip("corrupt_image", "key-1", "bad bytes")
        counter.skip("corrupt_image", "key-2")
        counter.skip("empty_caption", "key-3")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "key-1" in messages[0] and "corrupt_image" in messages[0] and "key-3" in messages[1]
    assert counter.take() == {"corrupt_image": 2, "empty_caption": 1}
    assert counter.take() == {}


def test_skip_stats_totals_and_ceiling():
    stats = SkipStats(max_skip_fraction=0.25, min_samples=10)
    stats.update({"corrupt_image": 2}, 6)  # 2 / 8 seen, below min_samples
    stats.update({"corrupt_image": 1, "empty_caption": 0}, 9)  # 3 / 18
    assert stats.counts == {"corrupt_image": 3} and stats.total_skipped == 3 and stats.n_ok == 15
    assert stats.fraction == pytest.approx(3 / 18)
    assert stats.as_dict()["data/skipped/corrupt_image"] == 3.0
    with pytest.raises(DataQualityError) as err:
        stats.update({"truncated_image": 4}, 0)  # 7 / 22 = 0.318
    text = str(err.value)
    assert "7 of 22" in text and "max_skip_fraction=0.25" in text and "corrupt_image: 3" in text
    assert "truncated_image: 4" in text
    restored = SkipStats(0.25, 10)
    restored.load_state_dict(stats.state_dict())
    assert restored.counts == stats.counts and restored.n_ok == stats.n_ok


def test_skip_stats_waits_for_min_samples():
    stats = SkipStats(max_skip_fraction=0.1, min_samples=100)
    stats.update({"corrupt_image": 50}, 10)  # 83% skipped but only 60 seen
    with pytest.raises(DataQualityError):
        stats.update({"corrupt_image": 50}, 0)


def test_reasons_are_documented():
    assert {
        "corrupt_image",
        "truncated_image",
        "empty_file",
        "not_an_image",
        "too_large",
        "missing_caption",
    } <= set(SKIP_REASONS)
    assert {"empty_caption", "bad_caption_encoding", "missing_file"} <= set(SKIP_REASONS)


def test_processor_skips_transform_failures_and_collates(clip_tokenizer):
    import random

    from mmclip.data.collate import RawSample, SampleProcessor, collate
    from mmclip.data.transforms import image_transform
    from mmclip.towers.base import DataConfig

    transform = image_transform(DataConfig(image_size=(8, 8)), train=False)
    processor = SampleProcessor(transform, train=False)
    good = encode(noise_image(12), "PNG")
    a = processor(RawSample("a", good, ["one", "two"], 3))
    b = processor(RawSample("b", good, "three"))
    assert a.captions == ["one", "two"] and b.captions == ["three"] and a.image.shape == (3, 8, 8)

    def broken(img, rng=None):
        raise ZeroDivisionError("boom")

    failing = SampleProcessor(broken, train=False)  # type: ignore[arg-type]
    assert failing(RawSample("c", good, ["x"])) is None and failing.skips.take() == {"decode_error": 1}
    batch = collate([a, b], clip_tokenizer, {"corrupt_image": 2})
    assert batch.caption_image_index.tolist() == [0, 0, 1] and batch.input_ids.shape == (3, 77)
    assert (
        batch.labels.tolist() == [3, -1]
        and batch.keys == ["a", "b"]
        and batch.skipped == {"corrupt_image": 2}
    )
    assert batch.captions == ["one", "two", "three"]
    train = SampleProcessor(image_transform(DataConfig(image_size=(8, 8)), train=True), train=True)
    picks = {
        train(RawSample("a", good, ["one", "two", "three"]), random.Random(s)).captions[0] for s in range(20)
    }
    assert picks == {"one", "two", "three"}
    one = collate(
        [train(RawSample("a", good, ["one", "two"]), random.Random(0))], clip_tokenizer, with_labels=False
    )
    assert one.caption_image_index is None and one.labels is None
