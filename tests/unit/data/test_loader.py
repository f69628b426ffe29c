"""Training loaders: exact resume (map-style and shards, 0 and 2 workers), exactly-once splits, epochs."""

from __future__ import annotations

import collections
import logging

import pytest
import torch

from mmclip.data.collate import RawSample
from mmclip.data.quality import DataQualityError
from mmclip.data.synthetic import SyntheticShapes
from mmclip.data.synthetic_module import SyntheticDataModule
from mmclip.data.wds import WebDatasetDataModule
from mmclip.data.writers import write_shards
from mmclip.towers.base import DataConfig
from tests.unit.data.corpus import bad_corpus


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """60 synthetic samples in 6 shards of 10, plus a copy with bad samples spread through them."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(SyntheticShapes("train", 60, image_size=16), root / "clean", "train", shard_size=10)
    samples = list(SyntheticShapes("train", 60, image_size=16))
    bad = [raw for raw, reason in bad_corpus() if reason is not None]
    mixed = []
    for i, raw in enumerate(samples):
        mixed.append(raw)
        if i % 5 == 2:
            mixed.append(bad[(i // 5) % len(bad)])
    write_shards(mixed, root / "mixed", "train", shard_size=12)
    return root


def _wds(root, sub, pattern, workers, tok, **kw):
    kw.setdefault("batch_size", 5)
    return WebDatasetDataModule(
        train_shards=str(root / sub / pattern),
        shuffle_buffer=7,
        num_workers=workers,
        tokenizer=tok,
        data_config=DataConfig(image_size=(16, 16)),
        **kw,
    )


def _map(workers, tok, **kw):
    kw.setdefault("batch_size", 6)
    return SyntheticDataModule(
        n_train=60, n_val=0, n_test=0, image_size=16, num_workers=workers, tokenizer=tok, **kw
    )


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys == y.keys
        and torch.equal(x.images, y.images)
        and torch.equal(x.input_ids, y.input_ids)
        and x.captions == y.captions
        and x.skipped == y.skipped
        for x, y in zip(a, b, strict=True)
    )


def _check_resume(make, workers: int) -> None:
    """Consume k batches, save, resume in a fresh loader: the rest equals the uninterrupted run (2 epochs).

    Without workers k = 3 (first epoch); with 2 workers k = len + 3 (second epoch, odd k: the resumed
    DataLoader must start its round-robin at the second worker).
    """
    loader = make().train_dataloader()
    n = len(loader)
    reference = list(loader) + list(loader)
    for k in (3,) if workers == 0 else (n + 3,):
        first = make().train_dataloader()
        it, got = iter(first), []
        for _ in range(min(k, n)):
            got.append(next(it))
        if k > n:
            assert next(it, None) is None
            it = iter(first)
            got += [next(it) for _ in range(k - n)]
        state = first.state_dict()
        assert state["epoch"] == k // n and state["consumed"] == k % n
        resumed = make().train_dataloader()
        resumed.load_state_dict(state)
        rest = list(resumed) + (list(resumed) if k < n else [])
        assert _same(got + rest, reference), k


@pytest.mark.parametrize("workers", [0, 2])
def test_map_resume_is_exact(workers, clip_tokenizer):
    _check_resume(lambda: _map(workers, clip_tokenizer, scale=(0.5, 1.0)), workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_resume_is_exact(shards, workers, clip_tokenizer):
    _check_resume(
        lambda: _wds(shards, "clean", "train-{000000..000005}.tar", workers, clip_tokenizer), workers
    )


def test_shard_resume_with_skipped_samples(shards, clip_tokenizer):
    make = lambda: _wds(shards, "mixed", "train-{000000..000005}.tar", 2, clip_tokenizer, epoch_length=60)  # noqa: E731
    _check_resume(make, 2)
    batches = list(make().train_dataloader())
    skipped = collections.Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert sum(skipped.values()) > 0 and set(skipped) <= {r for _, r in bad_corpus() if r}


@pytest.mark.parametrize("workers", [0, 2])
def test_map_ranks_see_every_sample_once(workers, clip_tokenizer):
    keys = []
    for rank in range(2):
        loader = _map(workers, clip_tokenizer).train_dataloader(rank=rank, world_size=2)
        assert len(loader) == 5
        keys += [k for b in loader for k in b.keys]
    assert sorted(keys) == [f"train-{i:08d}" for i in range(60)]


@pytest.mark.parametrize(
    "workers,world,pattern", [(2, 1, "{000000..000005}"), (2, 2, "{000000..000003}"), (0, 2, "000000")]
)
def test_shard_ranks_and_workers_see_every_sample_once(shards, workers, world, pattern, clip_tokenizer):
    keys = []
    for rank in range(world):
        loader = _wds(shards, "clean", f"train-{pattern}.tar", workers, clip_tokenizer).train_dataloader(
            rank, world
        )
        keys += [k for b in loader for k in b.keys]
    n = 10 * len(list(__import__("braceexpand").braceexpand(pattern)))
    counts = collections.Counter(keys)
    assert len(keys) == n and set(counts.values()) == {1}


def test_epochs_reshuffle_and_iter_probe(clip_tokenizer):
    loader = _map(0, clip_tokenizer).train_dataloader()
    iter(loader)  # Lightning probes iterability; it must not start an epoch
    first = [k for b in loader for k in b.keys]
    second = [k for b in loader for k in b.keys]
    assert loader.epoch == 1 and sorted(first) == sorted(second) and first != second


def test_layout_change_starts_next_epoch(caplog, clip_tokenizer):
    loader = _map(0, clip_tokenizer).train_dataloader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = _map(0, clip_tokenizer).train_dataloader(rank=0, world_size=2)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert "world_size: 1 -> 2" in caplog.text
    list(other)
    assert other.epoch == 1


def test_resampled_weighted_sources(shards, clip_tokenizer):
    spec = [
        str(shards / "clean" / "train-{000000..000002}.tar"),
        str(shards / "clean" / "train-{000003..000005}.tar"),
    ]
    dm = WebDatasetDataModule(
        train_shards=spec,
        train_weights=[3.0, 1.0],
        resampled=True,
        epoch_length=200,
        batch_size=10,
        shuffle_buffer=0,
        num_workers=0,
        tokenizer=clip_tokenizer,
        data_config=DataConfig(image_size=(16, 16)),
    )
    loader = dm.train_dataloader(rank=0, world_size=2)
    assert len(loader) == 10
    keys = [k for b in loader for k in b.keys]
    first_source = sum(int(k[-8:]) < 30 for k in keys) / len(keys)
    assert len(keys) == 100 and 0.6 < first_source < 0.9
    with pytest.raises(ValueError, match="resampled"):
        WebDatasetDataModule(train_shards=spec, train_weights=[1.0, 1.0], tokenizer=clip_tokenizer)


class _Broken:
    def __len__(self):
        return 20

    def get(self, index):
        return RawSample(f"k{index}", b"not an image", ["caption"])


def test_unfillable_batch_raises(clip_tokenizer):
    dm = _map(0, clip_tokenizer)
    dm._source = lambda split: _Broken()
    with pytest.raises(DataQualityError, match="no usable sample in one pass.*not_an_image: 20"):
        next(iter(dm.train_dataloader()))


def test_too_little_data_is_a_clear_error(clip_tokenizer):
    with pytest.raises(ValueError, match="fewer than world_size"):
        _map(0, clip_tokenizer, batch_size=40).train_dataloader(rank=0, world_size=2)
