"""Hugging Face datasets: save_to_disk, parquet, imagefolder with metadata, streaming, the bad-input corpus."""

from __future__ import annotations

import collections
import json

import datasets
import pytest
import torch

from mmclip.data.hf import HFDataModule
from mmclip.data.synthetic import SyntheticShapes, write_hf
from mmclip.data.writers import write_hf_dataset
from mmclip.towers.base import DataConfig
from tests.unit.data.corpus import bad_corpus, encode, expected_counts

SMALL = DataConfig(image_size=(16, 16))


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    write_hf(root / "disk", "train", 24, image_size=16)
    write_hf(root / "disk", "validation", 10, image_size=16)
    write_hf(root / "pq", "train", 12, file_format="parquet", image_size=16)
    write_hf(root / "pq", "val", 12, file_format="parquet", image_size=16)  # a second "file" of train data
    return root


def _dm(tok, path, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    return HFDataModule(path, tokenizer=tok, data_config=SMALL, **kw)


def test_save_to_disk_dataset_dict(data, clip_tokenizer):
    dm = _dm(
        clip_tokenizer, str(data / "disk"), caption_column="captions", label_column="label", key_column="key"
    )
    dm.setup("fit")
    ref = SyntheticShapes("train", 24, 16)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == 6 and sorted(k for b in batches for k in b.keys) == [
        f"train-{i:08d}" for i in range(24)
    ]
    for b in batches:
        for key, caption in zip(b.keys, b.captions, strict=True):
            assert caption in ref.get(int(key[-8:])).captions
    val = list(dm.val_dataloader())
    assert sum(len(b) for b in val) == 10 and val[0].input_ids.shape[0] == 5 * len(val[0])
    assert dm.retrieval_dataloader("test") is None
    labels = torch.cat([b.labels for b in dm.classification_dataloader("val")]).tolist()
    vref = SyntheticShapes("validation", 10, 16)
    assert labels == [vref.get(i).label for i in range(10) if vref.get(i).label >= 0]


def test_parquet_data_files(data, tmp_path, clip_tokenizer):
    files = {
        "train": str(data / "pq" / "train.parquet"),
        "val": str(data / "pq" / "val.parquet"),
    }  # "val" alias
    dm = _dm(clip_tokenizer, "parquet", data_files=files, cache_dir=str(tmp_path / "cache"), num_workers=2)
    keys = [k for b in dm.train_dataloader() for k in b.keys]
    assert len(keys) == 12 and len(set(keys)) == 12
    assert sum(len(b) for b in dm.val_dataloader()) == 12


def test_imagefolder_with_metadata(tmp_path, clip_tokenizer):
    folder = tmp_path / "folder" / "train"
    folder.mkdir(parents=True)
    ds = SyntheticShapes("train", 8, 16)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(8):
            raw = ds.get(i)
            raw.image.save(folder / f"img{i}.png")
            f.write(json.dumps({"file_name": f"img{i}.png", "text": raw.captions[0]}) + "\n")
    dm = _dm(
        clip_tokenizer,
        "imagefolder",
        data_dir=str(tmp_path / "folder"),
        caption_column="text",
        cache_dir=str(tmp_path / "c"),
    )
    batches = list(dm.train_dataloader())
    captions = sorted(c for b in batches for c in b.captions)
    assert captions == sorted(ds.get(i).captions[0] for i in range(8))
    assert batches[0].images.shape == (4, 3, 16, 16)


def test_streaming_split_by_worker_and_resume(data, tmp_path, clip_tokenizer):
    files = {"train": [str(data / "pq" / "train.parquet"), str(data / "pq" / "val.parquet")]}

    def make(workers):
        return _dm(
            clip_tokenizer,
            "parquet",
            data_files=files,
            streaming=True,
            epoch_length=24,
            shuffle_buffer=3,
            num_workers=workers,
            cache_dir=str(tmp_path / "c"),
        )

    loader = make(2).train_dataloader()
    assert len(loader) == 6
    keys = [k for b in loader for k in b.keys]
    assert len(keys) == 24 and len(set(keys)) == 24  # two files = two shards, one per worker
    reference = list(make(0).train_dataloader())
    first = make(0).train_dataloader()
    it = iter(first)
    got = [next(it) for _ in range(2)]
    resumed = make(0).train_dataloader()
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    assert [b.keys for b in got + rest] == [b.keys for b in reference]
    assert all(torch.equal(a.images, b.images) for a, b in zip(got + rest, reference, strict=True))


def test_image_paths_and_bad_corpus(tmp_path, clip_tokenizer):
    items = bad_corpus(with_bad_encoding=False)  # Arrow strings are always valid UTF-8
    write_hf_dataset([raw for raw, _ in items], tmp_path / "bad", "validation")
    dm = _dm(
        clip_tokenizer, str(tmp_path / "bad"), caption_column="captions", key_column="key", num_workers=2
    )
    batches = list(dm.val_dataloader())
    skipped = collections.Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert dict(skipped) == expected_counts(items)
    assert sorted(k for b in batches for k in b.keys) == sorted(raw.key for raw, r in items if r is None)

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(encode(__import__("PIL.Image").Image.new("RGB", (9, 9))))
    table = datasets.Dataset.from_dict({"path": ["a.png", "missing.png"], "caption": ["one", "two"]})
    table.save_to_disk(str(tmp_path / "paths" / "train"))
    (tmp_path / "paths" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    dm = _dm(
        clip_tokenizer,
        str(tmp_path / "paths"),
        image_column="path",
        image_root=str(tmp_path / "imgs"),
        splits={"val": "train"},
    )
    (batch,) = list(dm.val_dataloader())
    assert batch.keys == ["val-0"] and batch.skipped == {"missing_file": 1}


def test_missing_column_is_a_clear_error(data, clip_tokenizer):
    with pytest.raises(ValueError, match="not in the data set"):
        _dm(clip_tokenizer, str(data / "disk"), caption_column="text").train_dataloader()
