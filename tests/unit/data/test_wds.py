"""Webdataset shards: URL forms, sizes, evaluation loaders, the bad-input corpus, and ranks over gloo."""

from __future__ import annotations

import collections
import os
import tarfile

import pytest
import torch

from mmclip.data.quality import DataQualityError, SkipStats
from mmclip.data.synthetic import SyntheticShapes, write_webdataset
from mmclip.data.wds import ShardSource, WebDatasetDataModule, expand_urls, iter_tar, shard_size
from mmclip.data.writers import write_shards
from mmclip.towers.base import DataConfig
from tests.unit.data.corpus import bad_corpus, expected_counts

SMALL = DataConfig(image_size=(16, 16))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    write_webdataset(root, "train", 40, shard_size=10, image_size=16)
    write_webdataset(root, "val", 15, shard_size=4, image_size=16)
    return root


def _dm(tok, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    return WebDatasetDataModule(tokenizer=tok, data_config=SMALL, **kw)


def test_expand_urls():
    assert expand_urls("a-{0..2}.tar") == [["a-0.tar", "a-1.tar", "a-2.tar"]]
    assert expand_urls("a-{0..1}.tar::b.tar") == [["a-0.tar", "a-1.tar"], ["b.tar"]]
    assert expand_urls(["x-{a,b}.tar", "y.tar"]) == [["x-a.tar", "x-b.tar"], ["y.tar"]]
    with pytest.raises(ValueError):
        expand_urls("")


def test_sizes_from_json_and_scan(data, tmp_path):
    assert shard_size(str(data / "train-000003.tar")) == 10 and shard_size(str(data / "val-000003.tar")) == 3
    copy = tmp_path / "copy.tar"
    copy.write_bytes((data / "val-000003.tar").read_bytes())  # no sizes.json here: headers are scanned
    assert shard_size(str(copy)) == 3 and shard_size("https://example.com/x.tar") is None
    assert ShardSource(str(data / "train-{000000..000003}.tar")).num_samples() == 40


def test_url_forms_read_the_same_samples(data):
    path = str(data / "val-000000.tar")
    keys = [s["__key__"] for s in iter_tar(path)]
    assert keys == [f"val-{i:08d}" for i in range(4)]
    assert [s["__key__"] for s in iter_tar("file://" + path)] == keys
    assert [s["__key__"] for s in iter_tar(f"pipe:cat {path}")] == keys
    sample = next(iter(ShardSource(path).iter_shard(0)))
    ref = SyntheticShapes("val", 15, 16).get(0)
    assert (
        sample.captions == ref.captions and sample.label == ref.label and sample.image.startswith(b"\x89PNG")
    )


def test_eval_loader_has_every_sample_and_all_captions(data, clip_tokenizer):
    for workers in (0, 2):
        dm = _dm(clip_tokenizer, val_shards=str(data / "val-{000000..000003}.tar"), num_workers=workers)
        batches = list(dm.val_dataloader())
        keys = [k for b in batches for k in b.keys]
        assert sorted(keys) == [f"val-{i:08d}" for i in range(15)]
        for b in batches:
            assert b.input_ids.shape[0] == 5 * len(b) and b.caption_image_index.tolist() == [
                i // 5 for i in range(5 * len(b))
            ]
    shares = [
        [
            k
            for b in _dm(
                clip_tokenizer, val_shards=str(data / "val-{000000..000003}.tar")
            ).retrieval_dataloader("val", r, 2)
            for k in b.keys
        ]
        for r in range(2)
    ]
    assert sorted(shares[0] + shares[1]) == [f"val-{i:08d}" for i in range(15)] and not set(shares[0]) & set(
        shares[1]
    )
    assert (
        _dm(clip_tokenizer).val_dataloader() == []
        and _dm(clip_tokenizer).retrieval_dataloader("test") is None
    )


def test_classification_loader(data, clip_tokenizer):
    dm = _dm(clip_tokenizer, test_shards=str(data / "val-{000000..000003}.tar"), has_labels=True)
    batches = list(dm.classification_dataloader("test"))
    labels = torch.cat([b.labels for b in batches])
    ds = SyntheticShapes("val", 15, 16)
    assert labels.tolist() == [ds.get(i).label for i in range(15) if ds.get(i).label >= 0]
    assert _dm(clip_tokenizer, test_shards=str(data / "val-000000.tar")).classification_dataloader() is None


def test_unknown_size_needs_epoch_length(clip_tokenizer):
    dm = _dm(clip_tokenizer, train_shards="https://example.com/shard-{0..3}.tar")
    with pytest.raises(ValueError, match="epoch_length"):
        dm.train_dataloader()
    assert (
        len(
            _dm(
                clip_tokenizer, train_shards="https://example.com/shard-{0..3}.tar", epoch_length=64
            ).train_dataloader(0, 2)
        )
        == 8
    )


def _bad_shards(root):
    items = bad_corpus()
    write_shards([raw for raw, _ in items], root, "bad", shard_size=7)
    good = os.path.join(root, "bad-000000.tar")
    with tarfile.open(good) as tar:
        members = tar.getmembers()
    cut = members[len(members) // 2].offset_data + 10  # inside a member's data: a corrupt shard
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(root, "broken-000000.tar"), "wb") as f:
        f.write(data[:cut])
    return items


def test_bad_input_corpus_in_shards(tmp_path, clip_tokenizer):
    items = _bad_shards(tmp_path)
    n_shards = len(items) // 7 + (len(items) % 7 > 0)
    dm = _dm(
        clip_tokenizer, val_shards=str(tmp_path / f"bad-{{000000..{n_shards - 1:06d}}}.tar"), num_workers=2
    )
    batches = list(dm.val_dataloader())
    skipped = collections.Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert dict(skipped) == expected_counts(items)
    assert sorted(k for b in batches for k in b.keys) == sorted(
        raw.key for raw, reason in items if reason is None
    )
    assert all(torch.isfinite(b.images).all() for b in batches)
    broken = list(_dm(clip_tokenizer, val_shards=str(tmp_path / "broken-000000.tar")).val_dataloader())
    counts = collections.Counter()
    for b in broken:
        counts.update(b.skipped)
    assert counts["corrupt_shard"] == 1


def test_skip_ceiling_stops_training_on_garbage(tmp_path, clip_tokenizer):
    items = _bad_shards(tmp_path)
    dm = _dm(
        clip_tokenizer,
        train_shards=str(tmp_path / "bad-{000000..000002}.tar"),
        epoch_length=8,
        max_skip_fraction=0.2,
        min_skip_samples=5,
    )
    assert isinstance(dm.skip_stats, SkipStats)
    with pytest.raises(DataQualityError, match="max_skip_fraction=0.2"):
        for batch in dm.train_dataloader():
            dm.skip_stats.update(batch.skipped, len(batch))
    assert sum(r is not None for _, r in items) > 0


def _gloo_worker(rank: int, world: int, init_file: str, spec: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        dm = WebDatasetDataModule(
            train_shards=spec, batch_size=5, num_workers=0, shuffle_buffer=4, data_config=SMALL
        )
        keys = [
            k for b in dm.train_dataloader() for k in b.keys
        ]  # rank and world size from torch.distributed
        with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
            f.write("\n".join(keys))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters importing mmclip (~10-20 s on the shared 2-core machine)
def test_two_processes_over_gloo_split_by_node(data, tmp_path):
    spec = str(data / "train-{000000..000003}.tar")
    torch.multiprocessing.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), spec, str(tmp_path)), nprocs=2)
    keys = [(tmp_path / f"{r}.txt").read_text().split("\n") for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 20
    assert sorted(keys[0] + keys[1]) == [f"train-{i:08d}" for i in range(40)]
