"""A hostile corpus through every data module: bounded failure, damaged shards, strict CSV, bounded image
work, exactly-once epochs with skips, skip counts by reason."""

from __future__ import annotations

import collections
import io
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf

from mmclip.data.csv_data import CsvDataModule, CsvSource
from mmclip.data.hf import HFDataModule
from mmclip.data.quality import DataQualityError
from mmclip.data.transforms import image_transform
from mmclip.data.wds import WebDatasetDataModule, shard_size
from mmclip.data.writers import write_hf_dataset
from mmclip.embedding.sources import EmbedDataset, ShardsSource
from mmclip.towers.base import DataConfig
from tests.unit.data.corpus import (
    encode,
    gif_image,
    hostile_corpus,
    noise_image,
    sample_members,
    tar_bytes,
)

SMALL = DataConfig(image_size=(16, 16))
ROOT = Path(__file__).resolve().parents[3]


def _usable(items) -> set[str]:
    return {raw.key for raw, reason in items if reason is None}


def _reasons(items) -> dict[str, int]:
    return dict(collections.Counter(reason for _, reason in items if reason is not None))


def _write_tars(items, root: Path, prefix: str, per_shard: list[int]) -> str:
    """Shards of the given sizes (no sizes.json: local headers are scanned). Returns the brace spec."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(per_shard):
        members = [m for raw, _ in items[start : start + n] for m in sample_members(raw)]
        (root / f"{prefix}-{i:06d}.tar").write_bytes(tar_bytes(members))
        start += n
    assert start == len(items)
    return str(root / f"{prefix}-{{000000..{len(per_shard) - 1:06d}}}.tar")


def _write_csv(items, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [b"filepath,caption"]
    for raw, _ in items:
        name = raw.key if raw.key.endswith(".img") else f"{raw.key}.img"
        (root / name).write_bytes(raw.image)
        cap = raw.captions[0] if isinstance(raw.captions, list) else raw.captions
        if cap is None:
            lines.append(name.encode())  # one field: a malformed row
            continue
        cap = cap if isinstance(cap, bytes) else cap.encode()
        lines.append(f"{name},".encode() + b'"' + cap.replace(b'"', b'""') + b'"')
    (root / "train.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root / "train.csv"


def _csv_items(items):
    """The CSV's view of the corpus: keys are file names; a row without a caption field is malformed."""
    out = []
    for raw, reason in items:
        raw = type(raw)(f"{raw.key}.img", raw.image, raw.captions)
        out.append((raw, "malformed_row" if raw.captions is None else reason))
    return out


def _in_thread(fn, deadline: float):
    """Run ``fn`` in a thread; returns (seconds, exception) or fails if it is still running at ``deadline``."""
    box: dict[str, object] = {}

    def run():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001
            box["error"] = err

    t0 = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    assert not thread.is_alive(), f"the data loader still runs after {deadline} s (it hangs)"
    return time.perf_counter() - t0, box.get("error")


# ----------------------------------------------------------------- 1. all-bad data fails, bounded
ALL_BAD = [
    ("truncated", "truncated_image"),
    ("zero", "empty_file"),
    ("textjpg", "not_an_image"),
    ("bomb", "too_large"),
    ("capempty", "empty_caption"),
]


def _all_bad(n: int = 30):
    bad = {raw.key[4:]: (raw, reason) for raw, reason in hostile_corpus() if raw.key.startswith("odd-")}
    out = []
    for i in range(n):
        raw, reason = bad[ALL_BAD[i % len(ALL_BAD)][0]]
        out.append((type(raw)(f"bad{i:03d}", raw.image, raw.captions), reason))
    return out


@pytest.mark.parametrize(
    "workers,options",
    [(0, {}), (2, {}), (2, {"epoch_length": 400}), (2, {"resampled": True, "epoch_length": 400})],
    ids=["planned-0w", "planned-2w", "epoch_length-2w", "resampled-2w"],
)
def test_all_bad_stream_fails_within_bounded_work(tmp_path, clip_tokenizer, workers, options):
    items = _all_bad()
    spec = _write_tars(items, tmp_path, "bad", [10, 10, 10])
    dm = WebDatasetDataModule(
        train_shards=spec,
        batch_size=4,
        num_workers=workers,
        shuffle_buffer=4,
        tokenizer=clip_tokenizer,
        data_config=SMALL,
        **options,
    )
    seconds, error = _in_thread(lambda: [None for _ in dm.train_dataloader()], deadline=60)
    assert isinstance(error, DataQualityError), error
    assert "no usable sample" in str(error) and "truncated_image" in str(error)
    assert seconds < 30, seconds


def test_all_bad_map_data_fails_within_bounded_work(tmp_path, clip_tokenizer):
    items = _csv_items(_all_bad(80))  # more than min_skip_samples: the ceiling stops it mid-pass
    path = _write_csv(items, tmp_path)
    dm = CsvDataModule(path, batch_size=4, num_workers=0, min_skip_samples=40, tokenizer=clip_tokenizer)
    dm.data_config = SMALL
    seconds, error = _in_thread(lambda: next(iter(dm.train_dataloader())), deadline=60)
    assert isinstance(error, DataQualityError) and "max_skip_fraction" in str(error), error
    assert "truncated_image" in str(error) and seconds < 30


# ----------------------------------------------------------------- 2. damaged shards, duplicate keys
def _damaged_shards(root: Path):
    """good: 6 samples; truncated: 6 written, cut inside the 4th sample's image; zero-byte; empty tar;
    dup: 4 samples, the 2nd key written twice (the second copy is a duplicate_key skip)."""
    good = [(raw, None) for raw, _ in hostile_corpus(20) if raw.key.startswith("good")]
    root.mkdir(parents=True, exist_ok=True)
    (root / "s-000000.tar").write_bytes(tar_bytes([m for raw, _ in good[:6] for m in sample_members(raw)]))
    full = tar_bytes([m for raw, _ in good[6:12] for m in sample_members(raw)])
    with tarfile.open(fileobj=io.BytesIO(full)) as tar:
        cut = tar.getmembers()[6].offset_data + 100  # 3 samples (image + caption), then inside the 4th image
    (root / "s-000001.tar").write_bytes(full[:cut])
    (root / "s-000002.tar").write_bytes(b"")
    (root / "s-000003.tar").write_bytes(tar_bytes([]))
    dup = [m for raw, _ in good[12:16] for m in sample_members(raw)]
    (root / "s-000004.tar").write_bytes(tar_bytes(dup[:4] + dup[2:4] + dup[4:]))
    usable = {raw.key for raw, _ in good[:6] + good[6:9] + good[12:16]}
    return str(root / "s-{000000..000004}.tar"), usable


def test_damaged_shards_are_counted_and_never_stop_a_run(tmp_path, clip_tokenizer):
    spec, usable = _damaged_shards(tmp_path)
    sizes = [shard_size(str(tmp_path / f"s-00000{i}.tar")) for i in range(5)]
    assert sizes == [6, 3, 0, 0, 5]  # damaged tails are not trusted; the duplicate holds a place
    dm = WebDatasetDataModule(
        train_shards=spec, batch_size=4, num_workers=2, shuffle_buffer=0, tokenizer=clip_tokenizer
    )
    dm.data_config = SMALL
    keys = [k for b in dm.train_dataloader() for k in b.keys]  # no epoch_length needed
    assert sorted(keys) == sorted(usable)
    stats = dm.skip_stats.as_dict()
    assert stats["data/skipped/corrupt_shard"] == 2 and stats["data/skipped/duplicate_key"] == 1


def test_embed_reads_damaged_shards(tmp_path):
    spec, usable = _damaged_shards(tmp_path)
    source = ShardsSource(spec)  # used to raise: the size of a damaged shard was unknown
    assert len(source) == 14
    dataset = EmbedDataset(source, range(3), 5, 4, transform=image_transform(SMALL, train=False))
    batches = list(dataset)
    skipped = collections.Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert sorted(i for b in batches for i in b.ids) == sorted(usable)
    assert skipped == {"corrupt_shard": 2, "duplicate_key": 1}  # the zero-byte shard too
    assert sum(b.seen for b in batches) == 14


def test_gif_member_decodes(tmp_path, clip_tokenizer):
    members = [
        ("a.gif", gif_image()),
        ("a.txt", b"a gif"),
        ("b.png", encode(noise_image(8))),
        ("b.txt", b"b"),
    ]
    (tmp_path / "g.tar").write_bytes(tar_bytes(members))
    dm = WebDatasetDataModule(
        val_shards=str(tmp_path / "g.tar"), batch_size=4, num_workers=0, tokenizer=clip_tokenizer
    )
    dm.data_config = SMALL
    (batch,) = list(dm.val_dataloader())
    assert batch.keys == ["a", "b"] and batch.skipped == {}


# ----------------------------------------------------------------- 3. strict CSV
def test_malformed_csv_rows_are_counted_skips(tmp_path, caplog):
    for name in ("a", "b", "c", "d"):
        (tmp_path / f"{name}.png").write_bytes(encode(noise_image(8)))
    text = (
        "filepath,caption\n"
        'a.png,"an unclosed quote\n'  # line 2: must not swallow line 3
        "b.png,second row\n"
        "c.png,a caption,an extra field\n"  # line 4
        "d.png\n"  # line 5: a missing field
        'd.png,"quoted, with a comma"\n'
    )
    (tmp_path / "l.csv").write_text(text)
    with caplog.at_level(logging.WARNING):
        src = CsvSource(tmp_path / "l.csv", group_captions=False)
    assert "line 2, 4, 5" in caplog.text and "malformed_row" in caplog.text
    rows = [src.get(i) for i in range(len(src))]
    assert [r.skip for r in rows] == ["malformed_row", None, "malformed_row", "malformed_row", None]
    assert rows[1].captions == ["second row"] and rows[4].captions == ["quoted, with a comma"]
    assert [r.key for r in rows if r.skip] == ["line 2", "line 4", "line 5"]


# ----------------------------------------------------------------- 4. bounded image work
_MEMORY_PROBE = textwrap.dedent(
    """
    import io, resource, sys
    from PIL import Image
    from mmclip.data.quality import decode_image
    from mmclip.data.transforms import image_transform
    from mmclip.towers.base import DataConfig

    def peak_kb():
        try:
            with open("/proc/self/status") as f:
                return int(next(l for l in f if l.startswith("VmHWM")).split()[1])
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    size = int(sys.argv[1])
    buf = io.BytesIO()
    Image.new("L", (600000, 2), 128).save(buf, "PNG")
    data = buf.getvalue()
    t = image_transform(DataConfig(image_size=(size, size)), train=False)
    small = io.BytesIO(); Image.new("RGB", (40, 30)).save(small, "PNG"); t(decode_image(small.getvalue()))
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    except OSError:
        pass
    before = peak_kb()
    out = t(decode_image(data))
    print(len(data), (peak_kb() - before) / 1024, tuple(out.shape))
    """
)


def test_huge_aspect_png_costs_bounded_memory():
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, "224"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    nbytes, added_mb, shape = out.stdout.split(maxsplit=2)
    assert int(nbytes) < 2000 and shape.strip() == "(3, 224, 224)"
    assert float(added_mb) < 100, f"600000x2 PNG at 224 px added {added_mb} MB of peak memory"


# ----------------------------------------------------------------- 5./6. exactly-once epochs with skips
def _wds_module(tmp_path, items, tok, workers):
    spec = _write_tars(items, tmp_path, "h", [9, 9, 8, 7, 6, 5])  # uneven shards
    return WebDatasetDataModule(
        train_shards=spec,
        batch_size=4,
        num_workers=workers,
        shuffle_buffer=5,
        tokenizer=tok,
        data_config=SMALL,
    )


def _csv_module(tmp_path, items, tok, workers):
    return CsvDataModule(
        _write_csv(items, tmp_path), batch_size=4, num_workers=workers, tokenizer=tok, data_config=SMALL
    )


def _hf_module(tmp_path, items, tok, workers):
    datasets.disable_progress_bars()
    write_hf_dataset([raw for raw, _ in items], tmp_path / "hf", "train")
    return HFDataModule(
        str(tmp_path / "hf"),
        key_column="key",
        batch_size=4,
        num_workers=workers,
        tokenizer=tok,
        data_config=SMALL,
    )


def _corpus(kind: str):
    items = hostile_corpus(24, bytes_captions=kind != "hf")
    if kind == "wds":  # a duplicate key in the same shard as its first copy
        first = items[1][0]
        items.insert(2, (type(first)(first.key, first.image, ["again"]), "duplicate_key"))
    return _csv_items(items) if kind == "csv" else items


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["wds", "csv", "hf"])
def test_every_usable_sample_exactly_once_per_epoch(tmp_path, clip_tokenizer, kind, workers, world):
    items = _corpus(kind)
    make = {"wds": _wds_module, "csv": _csv_module, "hf": _hf_module}[kind]
    dm = make(tmp_path, items, clip_tokenizer, workers)
    keys, skipped, lengths = [], collections.Counter(), []
    for rank in range(world):
        loader = dm.train_dataloader(rank=rank, world_size=world)
        batches = list(loader)
        lengths.append((len(loader), len(batches)))
        assert all(len(b) <= 4 for b in batches)
        keys += [k for b in batches for k in b.keys]
        for b in batches:
            skipped.update(b.skipped)
    assert len({n for pair in lengths for n in pair}) == 1, lengths  # the same batch count on every rank
    counts = collections.Counter(keys)
    assert set(counts.values()) == {1} and set(counts) == _usable(items)
    assert dict(skipped) == _reasons(items)
    logged = dm.skip_stats.as_dict()  # what the training task logs as data/skipped/<reason>
    assert {k: v for k, v in logged.items() if k.startswith("data/skipped/")} == {
        f"data/skipped/{r}": float(n) for r, n in _reasons(items).items()
    }


def test_map_resume_with_skips_is_exact(tmp_path, clip_tokenizer):
    from tests.unit.data.test_loader import _check_resume

    items = _csv_items(hostile_corpus(24))
    path = _write_csv(items, tmp_path)
    _check_resume(
        lambda: CsvDataModule(
            path,
            batch_size=4,
            num_workers=2,
            tokenizer=clip_tokenizer,
            data_config=SMALL,
            max_skip_fraction=1.0,
        ),
        2,
    )


# ----------------------------------------------------------------- 7. recipes
@pytest.mark.parametrize("name", ["csv", "hf", "webdataset"])
def test_recipes_expose_max_skip_fraction(name):
    cfg = OmegaConf.load(ROOT / "recipes" / "data" / f"{name}.yaml")
    assert "max_skip_fraction" in cfg and 0 < cfg.max_skip_fraction <= 1
    assert os.path.exists(ROOT / "recipes" / "data" / f"{name}.yaml")
