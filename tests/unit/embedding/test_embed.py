"""Embedding stores: every source kind gives the model's own embeddings; layout, resume, Lightning path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmclip
from mmclip.data.synthetic import SyntheticShapes, write_hf, write_webdataset
from mmclip.data.transforms import image_transform
from mmclip.embedding.sources import build_source
from mmclip.embedding.writer import EmbeddingStore, StoreMismatchError, embed_corpus

FP16_ATOL = 1e-3  # unit vectors stored as float16: rounding <= 2^-11 per entry, plus fp32 noise
N_IMAGES = 23


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mmclip.create_model("tiny-vit").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return mmclip.get_tokenizer("clip")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """23 PNG scenes at two depths and three sizes, a .jpg that is no image, and a .txt file."""
    root = tmp_path_factory.mktemp("images")
    shapes = SyntheticShapes("val", N_IMAGES, image_size=40)
    for i in range(N_IMAGES):
        sub = ("", "b/", "a/deep/")[i % 3]
        (root / sub).mkdir(parents=True, exist_ok=True)
        shapes.get(i).image.resize((40 + 8 * (i % 3), 40)).save(root / f"{sub}img{i:03d}.png")
    (root / "a" / "broken.jpg").write_bytes(b"these bytes are no image")
    (root / "notes.txt").write_text("not an image")
    return root


def _reference_images(model, images: list[Image.Image]) -> np.ndarray:
    transform = image_transform(model.data_config, train=False)
    with torch.no_grad():
        return model.encode_image(torch.stack([transform(im) for im in images]), normalize=True).numpy()


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _embed(model, tokenizer, kind, path, out, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    kw.setdefault("shard_size", 5)
    kw.setdefault("progress", False)
    return embed_corpus(model, tokenizer, build_source(kind, path), out, **kw)


def test_image_folder_matches_encode_image(model, tokenizer, folder, tmp_path):
    result = _embed(model, tokenizer, "images", folder, tmp_path / "out")
    expected_ids = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*") if p.suffix != ".txt")
    assert len(expected_ids) == N_IMAGES + 1
    store = EmbeddingStore(tmp_path / "out")
    assert store.meta["num_samples"] == N_IMAGES + 1 and store.num_shards == 5  # ceil(24 / 5)
    assert store.meta["modality"] == "image" and store.meta["dtype"] == "float16" and store.meta["dim"] == 32
    ids = store.ids().to_pydict()
    broken = expected_ids.index("a/broken.jpg")
    assert ids["id"] == [x for x in expected_ids if x != "a/broken.jpg"]
    assert ids["index"] == [
        i for i in range(N_IMAGES + 1) if i != broken
    ]  # positions kept, the bad one absent
    assert set(store.columns) == {"index", "id"}  # a folder has no captions or labels
    for shard in range(store.num_shards):
        emb, table = store.shard(shard)
        assert emb.dtype == np.float16 and emb.shape == (table.num_rows, 32)
        assert all(shard * 5 <= i < shard * 5 + 5 for i in table.column("index").to_pylist())
    assert result.skipped == {"not_an_image": 1} and result.embedded == N_IMAGES
    got = store.embeddings(np.float32)
    ref = _reference_images(model, [Image.open(folder / i).convert("RGB") for i in ids["id"]])
    np.testing.assert_allclose(got, ref, atol=FP16_ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=FP16_ATOL)


def test_shards_match_encode_image_across_tar_boundaries(model, tokenizer, tmp_path):
    write_webdataset(tmp_path / "wds", "val", n=13, shard_size=5, image_size=32)  # tars of 5, 5, 3
    pattern = str(tmp_path / "wds" / "val-{000000..000002}.tar")
    _embed(model, tokenizer, "shards", pattern, tmp_path / "out", shard_size=4)  # store shards 4, 4, 4, 1
    store = EmbeddingStore(tmp_path / "out")
    assert store.shard_rows == [4, 4, 4, 1]
    shapes = SyntheticShapes("val", 13, image_size=32)
    samples = [shapes.get(i) for i in range(13)]
    table = store.ids().to_pydict()
    assert table["id"] == [s.key for s in samples] and table["index"] == list(range(13))
    assert table["captions"] == [s.captions for s in samples]
    assert table["caption"] == [s.captions[0] for s in samples]
    assert table["label"] == [s.label for s in samples]
    ref = _reference_images(model, [s.image for s in samples])
    np.testing.assert_allclose(store.embeddings(np.float32), ref, atol=FP16_ATOL, rtol=0)


def test_hf_dataset_matches_encode_image(model, tokenizer, tmp_path):
    import datasets

    datasets.disable_progress_bars()
    write_hf(tmp_path / "hf", "val", 9, image_size=32)
    _embed(model, tokenizer, "hf", tmp_path / "hf", tmp_path / "out", shard_size=4)
    store = EmbeddingStore(tmp_path / "out")
    assert store.meta["source"]["split"] == "val"  # the only split of the DatasetDict
    shapes = SyntheticShapes("val", 9, image_size=32)
    samples = [shapes.get(i) for i in range(9)]
    table = store.ids().to_pydict()
    assert table["id"] == [str(i) for i in range(9)]  # row index
    assert table["captions"] == [s.captions for s in samples] and table["label"] == [s.label for s in samples]
    ref = _reference_images(model, [s.image for s in samples])
    np.testing.assert_allclose(store.embeddings(np.float32), ref, atol=FP16_ATOL, rtol=0)


def test_text_file_matches_encode_text(model, tokenizer, tmp_path):
    lines = ["a red circle", "two blue squares on the left", "", "a small green cross"] + [
        f"scene number {i} with a yellow triangle" for i in range(7)
    ]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n")
    result = _embed(model, tokenizer, "text", tmp_path / "texts.txt", tmp_path / "out", shard_size=3)
    store = EmbeddingStore(tmp_path / "out")
    assert store.meta["modality"] == "text" and store.meta["num_samples"] == len(lines)
    kept = [i for i, t in enumerate(lines) if t]
    table = store.ids().to_pydict()
    assert table["id"] == [str(i + 1) for i in kept] and table["caption"] == [lines[i] for i in kept]
    assert result.skipped == {"empty_caption": 1}
    with torch.no_grad():
        ref = model.encode_text(tokenizer([lines[i] for i in kept]), normalize=True).numpy()
    np.testing.assert_allclose(store.embeddings(np.float32), ref, atol=FP16_ATOL, rtol=0)


def test_resume_redoes_only_missing_shards_byte_identically(model, tokenizer, folder, tmp_path):
    out = tmp_path / "out"
    _embed(model, tokenizer, "images", folder, out)
    full = _files(out)
    untouched = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # a crash after shard 3's embeddings, before its ids; shard 1 lost both files; a stale temp file
    (out / "ids-00003.parquet").unlink()
    (out / "ids-00001.parquet").unlink()
    (out / "emb-00001.npy").unlink()
    (out / "ids-00003.parquet.tmp").write_bytes(b"half a file")
    result = _embed(model, tokenizer, "images", folder, out)
    assert (result.shards_written, result.shards_already_done) == (2, 3)
    assert _files(out) == full
    for name in ("emb-00000.npy", "ids-00000.parquet", "ids-00004.parquet", "meta.json"):
        assert (out / name).stat().st_mtime_ns == untouched[name], f"{name} was rewritten"


def test_resume_with_other_settings_is_a_clear_error(model, tokenizer, folder, tmp_path):
    out = tmp_path / "out"
    _embed(model, tokenizer, "images", folder, out)
    with pytest.raises(StoreMismatchError, match="shard_size: 5 -> 6"):
        _embed(model, tokenizer, "images", folder, out, shard_size=6)
    with pytest.raises(StoreMismatchError, match="precision"):
        _embed(model, tokenizer, "images", folder, out, precision="bf16")
    with pytest.raises(StoreMismatchError, match="model.checkpoint"):
        _embed(model, tokenizer, "images", folder, out, model_spec={"checkpoint": "other.safetensors"})
    (folder / "extra.png").write_bytes((folder / "img000.png").read_bytes())
    try:
        with pytest.raises(StoreMismatchError, match="num_samples: 24 -> 25"):
            _embed(model, tokenizer, "images", folder, out)
    finally:
        (folder / "extra.png").unlink()
    # batch size and workers do not change the store: resuming with others is fine
    _embed(model, tokenizer, "images", folder, out, batch_size=3, num_workers=1)


def test_lightning_predict_loop_writes_the_same_bytes(model, tokenizer, folder, tmp_path):
    from mmclip.embedding.predict import embed_corpus_lightning

    _embed(model, tokenizer, "images", folder, tmp_path / "plain")
    result = embed_corpus_lightning(
        model,
        tokenizer,
        build_source("images", folder),
        tmp_path / "lightning",
        accelerator="cpu",
        devices=1,
        batch_size=4,
        num_workers=2,  # two workers produce interleaved shards
        shard_size=5,
        progress=False,
    )
    assert result.shards_written == 5 and result.skipped == {"not_an_image": 1}
    assert _files(tmp_path / "lightning") == _files(tmp_path / "plain")


def test_bf16_autocast_and_channels_last(tokenizer, tmp_path):
    torch.manual_seed(0)
    resnet = mmclip.create_model("tiny-resnet").eval()
    shapes = SyntheticShapes("val", 6, image_size=64)
    (tmp_path / "img").mkdir()
    for i in range(6):
        shapes.get(i).image.save(tmp_path / "img" / f"{i}.png")
    kw = dict(shard_size=4, batch_size=3)
    _embed(resnet, tokenizer, "images", tmp_path / "img", tmp_path / "fp32", channels_last=True, **kw)
    _embed(resnet, tokenizer, "images", tmp_path / "img", tmp_path / "bf16", precision="bf16-mixed", **kw)
    fp32, bf16 = EmbeddingStore(tmp_path / "fp32"), EmbeddingStore(tmp_path / "bf16")
    assert bf16.meta["precision"] == "bf16"
    ref = _reference_images(resnet, [shapes.get(i).image for i in range(6)])
    np.testing.assert_allclose(fp32.embeddings(np.float32), ref, atol=FP16_ATOL, rtol=0)
    diff = np.abs(bf16.embeddings(np.float32) - ref).max()
    assert 0 < diff < 0.05, diff  # bf16 really ran (not bit-equal) and stays close


def test_store_reader(model, tokenizer, folder, tmp_path):
    out = tmp_path / "out"
    _embed(model, tokenizer, "images", folder, out)
    store = EmbeddingStore(out)
    parts = [store.shard(i) for i in range(store.num_shards)]
    assert len(store) == sum(t.num_rows for _, t in parts) == N_IMAGES
    np.testing.assert_array_equal(store.embeddings(), np.concatenate([e for e, _ in parts]))
    assert store.embeddings(np.float32).dtype == np.float32
    assert store.rows([0, 22, 7], ["id"]) == [{"id": store.ids()["id"][r].as_py()} for r in (0, 22, 7)]
    blocks = list(store.iter_chunks(3))
    offsets = np.cumsum([0, *store.shard_rows])[:-1]
    starts = [int(o) + a for o, n in zip(offsets, store.shard_rows, strict=True) for a in range(0, n, 3)]
    assert [r for r, _ in blocks] == starts  # blocks of <= 3 rows that never span two shards
    assert max(len(b) for _, b in blocks) == 3
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), store.embeddings())
    assert json.loads((out / "meta.json").read_text()) == store.meta
    shutil.move(out / "ids-00002.parquet", tmp_path / "moved")
    assert store.missing_shards == [2] and not store.complete
    with pytest.raises(FileNotFoundError, match="run `mmclip embed` again"):
        EmbeddingStore(out).embeddings()


def test_build_source_errors(folder):
    with pytest.raises(ValueError, match="unknown source kind 'folder'"):
        build_source("folder", folder)
    with pytest.raises(ValueError, match="takes options"):
        build_source("images", folder, split="train")
    assert len(build_source("images", folder, extensions=[".jpg"])) == 1
