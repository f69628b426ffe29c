"""CSV / TSV data: grouping of captions, relative paths, labels, and every bad row a CSV can hold."""

from __future__ import annotations

import collections

import torch
from PIL import Image

from mmclip.data.csv_data import CsvDataModule, CsvSource
from mmclip.data.synthetic import SyntheticShapes, write_csv
from mmclip.towers.base import DataConfig
from tests.unit.data.corpus import bad_corpus, encode

SMALL = DataConfig(image_size=(16, 16))


def _dm(tok, train=None, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    return CsvDataModule(train, tokenizer=tok, data_config=SMALL, **kw)


def test_csv_and_tsv_written_by_synthetic(tmp_path, clip_tokenizer):
    train = write_csv(tmp_path, "train", 12, image_size=16)
    val = write_csv(tmp_path, "val", 6, image_size=16, sep="\t")
    assert val.endswith("val.tsv")
    dm = _dm(clip_tokenizer, train, val_file=val, label_column="label", num_workers=2)
    ref = SyntheticShapes("train", 12, 16)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for b in batches:
        for key, caption in zip(b.keys, b.captions, strict=True):
            assert key.startswith("train/") and caption in ref.get(int(key[-12:-4])).captions
    val_batches = list(dm.val_dataloader())
    assert sum(len(b) for b in val_batches) == 6 and all(
        b.input_ids.shape[0] == 5 * len(b) for b in val_batches
    )
    vref = SyntheticShapes("val", 6, 16)
    labels = torch.cat([b.labels for b in dm.classification_dataloader("val")]).tolist()
    assert labels == [vref.get(i).label for i in range(6) if vref.get(i).label >= 0]
    assert _dm(clip_tokenizer, train).classification_dataloader() is None


def test_grouping_and_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "list.csv").write_text("img,text\na.png,first\nb.png,other\na.png,second\n")
    src = CsvSource(
        tmp_path / "list.csv", image_column="img", caption_column="text", image_root=tmp_path / "imgs"
    )
    assert (
        len(src) == 2
        and src.get(0).captions == ["first", "second"]
        and src.get(0).image == str(tmp_path / "imgs" / "a.png")
    )
    flat = CsvSource(tmp_path / "list.csv", image_column="img", caption_column="text", group_captions=False)
    assert len(flat) == 3


def test_bad_rows(tmp_path, clip_tokenizer):
    good = tmp_path / "good.png"
    good.write_bytes(encode(Image.new("RGB", (10, 10), (1, 2, 3))))
    files = {}
    for raw, reason in bad_corpus(with_bad_encoding=False):
        if raw.image is not None and reason not in ("missing_caption", "empty_caption"):
            (tmp_path / f"{raw.key}.img").write_bytes(raw.image)
            files[raw.key] = reason
    rows = [b"filepath,caption"]
    rows += [f"{key}.img,caption of {key}".encode() for key in files]
    rows += [
        b"good.png,  ",  # empty caption
        b"good.png,",  # another empty caption of the same image: the sample is skipped once
        b"absent.png,a file that does not exist",
        b",no image path",
        b"latin.png,caf\xe9 in latin-1",  # not UTF-8
    ]
    (tmp_path / "latin.png").write_bytes(good.read_bytes())
    (tmp_path / "bad.csv").write_bytes(b"\n".join(rows) + b"\n")
    dm = _dm(clip_tokenizer, None, val_file=tmp_path / "bad.csv", num_workers=2)
    batches = list(dm.val_dataloader())
    skipped = collections.Counter()
    for b in batches:
        skipped.update(b.skipped)
    want = collections.Counter(r for r in files.values() if r is not None)
    want.update(["empty_caption", "missing_file", "missing_image", "bad_caption_encoding"])
    assert skipped == want
    assert sorted(k for b in batches for k in b.keys) == sorted(
        f"{k}.img" for k, r in files.items() if r is None
    )
