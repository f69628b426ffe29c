"""CachedEmbeddingDataModule: batches are the stored rows, rank splits, exact resume, the image module's
captions and order, clear errors, and a LiT step that trains only the text side."""

from __future__ import annotations

import collections

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from mmclip.data.synthetic import SyntheticShapes
from mmclip.data.synthetic_module import SyntheticDataModule
from mmclip.embedding.cached import CachedEmbeddingDataModule, EmbeddingSource
from mmclip.embedding.store import write_embeddings
from mmclip.towers.base import DataConfig
from mmclip.towers.image.precomputed import PrecomputedTower

N, D = 30, 8


def write_store(out, embeddings, ids, captions=None, labels=None, shard_size=4, modality="image"):
    """A store as `mmclip embed` writes it (``mmclip.embedding.store.write_embeddings``)."""
    write_embeddings(
        out, embeddings, list(ids), captions=captions, labels=labels, shard_size=shard_size, modality=modality
    )
    return out


def _captions(i: int) -> list[str]:
    return [f"caption {j} of sample {i}" for j in range(1 + i % 3)]  # 1 to 3 captions


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    emb = np.random.default_rng(0).standard_normal((N, D))
    ids = [f"img/{i:03d}.png" for i in range(N)]
    write_store(
        root / "train",
        emb,
        ids,
        [_captions(i) for i in range(N)],
        labels=[i % 4 for i in range(N)],
        shard_size=7,
    )
    write_store(root / "val", emb[:10], ids[:10], [_captions(i) for i in range(10)], shard_size=4)
    # the reference rows: what the float16 files hold
    rows = np.concatenate([np.load(root / "train" / f"emb-{i:05d}.npy") for i in range(5)])
    return root, dict(zip(ids, rows.astype(np.float32), strict=True))


def _dm(root, tok, **kw) -> CachedEmbeddingDataModule:
    kw.setdefault("batch_size", 5)
    kw.setdefault("num_workers", 0)
    return CachedEmbeddingDataModule(
        train_store=str(root / "train"), val_store=str(root / "val"), tokenizer=tok, **kw
    )


def _epoch(loader):
    return list(loader)


def test_source_reads_every_row_in_order(store):
    root, rows = store
    source = EmbeddingSource(root / "train")
    assert len(source) == N and source.dim == D
    for i in (0, 6, 7, 29):  # shard boundaries (shard_size 7)
        raw = source.get(i)
        assert raw.key == f"img/{i:03d}.png" and raw.captions == _captions(i) and raw.label == i % 4
        assert np.array_equal(np.asarray(raw.image, dtype=np.float32), rows[raw.key])
    np.testing.assert_array_equal(source.embeddings().astype(np.float32), np.stack(list(rows.values())))


def test_train_batches_are_the_stored_rows_with_one_of_their_captions(store, clip_tokenizer):
    root, rows = store
    dm = _dm(root, clip_tokenizer)
    loader = dm.train_dataloader(rank=0, world_size=1)
    assert len(loader) == N // 5
    for batch in _epoch(loader):
        assert batch.images.dtype == torch.float32 and batch.images.shape == (5, D)
        assert batch.caption_image_index is None and batch.labels is None
        for key, image, caption in zip(batch.keys, batch.images, batch.captions, strict=True):
            assert torch.equal(image, torch.from_numpy(rows[key]))
            assert caption in _captions(int(key[4:7]))
        assert torch.equal(batch.input_ids, clip_tokenizer(batch.captions))


def test_retrieval_batches_carry_every_caption(store, clip_tokenizer):
    root, rows = store
    dm = _dm(root, clip_tokenizer, eval_batch_size=4)
    batches = list(dm.retrieval_dataloader("val"))
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"img/{i:03d}.png" for i in range(10)]
    for b in batches:
        index = b.text_to_image.tolist()
        for row, key in enumerate(b.keys):
            assert torch.equal(b.images[row], torch.from_numpy(rows[key]))
            assert [c for c, r in zip(b.captions, index, strict=True) if r == row] == _captions(int(key[4:7]))
    assert dm.retrieval_dataloader("test") is None and dm.classification_dataloader("test") is None


def test_each_sample_once_per_epoch_across_two_ranks(store, clip_tokenizer):
    root, _ = store
    dm = _dm(root, clip_tokenizer)
    for epoch in range(2):
        seen = collections.Counter()
        loaders = [dm.train_dataloader(rank=r, world_size=2) for r in range(2)]
        for loader in loaders:
            for _ in range(epoch):  # advance to the epoch
                _epoch(loader)
            seen.update(k for b in _epoch(loader) for k in b.keys)
        assert sorted(seen) == sorted(f"img/{i:03d}.png" for i in range(N)) and set(seen.values()) == {1}


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_mid_epoch(store, clip_tokenizer, workers):
    root, _ = store
    full = _epoch(_dm(root, clip_tokenizer, num_workers=workers).train_dataloader(0, 1))
    first = _dm(root, clip_tokenizer, num_workers=workers).train_dataloader(0, 1)
    it = iter(first)
    head = [next(it), next(it)]
    state = first.state_dict()
    it.close()
    resumed = _dm(root, clip_tokenizer, num_workers=workers).train_dataloader(0, 1)
    resumed.load_state_dict(state)
    tail = _epoch(resumed)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.input_ids, b.input_ids)


def test_same_order_and_captions_as_the_image_module(tmp_path, clip_tokenizer):
    """Indexed like the source it was embedded from, the cached module picks what the image module picks."""
    shapes = SyntheticShapes("train", 24, image_size=16)
    raws = [shapes.get(i) for i in range(24)]
    emb = np.random.default_rng(1).standard_normal((24, D))
    write_store(tmp_path / "s", emb, [r.key for r in raws], [r.captions for r in raws], shard_size=10)
    cached = CachedEmbeddingDataModule(
        train_store=str(tmp_path / "s"), tokenizer=clip_tokenizer, batch_size=4, num_workers=0, seed=3
    )
    images = SyntheticDataModule(
        n_train=24,
        n_val=0,
        n_test=0,
        image_size=16,
        tokenizer=clip_tokenizer,
        batch_size=4,
        num_workers=0,
        seed=3,
    )
    for epoch_a, epoch_b in zip(*(list(dm.train_dataloader(0, 1)) for dm in (cached, images)), strict=True):
        assert epoch_a.keys == epoch_b.keys and epoch_a.captions == epoch_b.captions


def test_single_caption_column(tmp_path, clip_tokenizer):
    import pyarrow.parquet as pq

    write_store(tmp_path / "s", np.eye(4, D), list("abcd"), [[f"c{i}", "x"] for i in range(4)])
    for path in (tmp_path / "s").glob("ids-*.parquet"):  # a store with the first caption only
        pq.write_table(pq.read_table(path).drop_columns(["captions"]), path)
    b = next(
        iter(
            CachedEmbeddingDataModule(
                val_store=str(tmp_path / "s"), tokenizer=clip_tokenizer
            ).retrieval_dataloader("val")
        )
    )
    assert b.captions == ["c0", "c1", "c2", "c3"]


def test_errors_name_the_fix(store, tmp_path, clip_tokenizer):
    root, _ = store
    with pytest.raises(FileNotFoundError, match="mmclip embed"):
        EmbeddingSource(tmp_path / "nothing")
    write_store(tmp_path / "text", np.eye(3, D), ["0", "1", "2"], [["a"], ["b"], ["c"]], modality="text")
    with pytest.raises(ValueError, match="image store"):
        EmbeddingSource(tmp_path / "text")
    write_store(tmp_path / "part", np.eye(6, D), list("abcdef"), [["a"]] * 6, shard_size=2)
    (tmp_path / "part" / "ids-00001.parquet").unlink()
    with pytest.raises(ValueError, match="incomplete.*resumes"):
        EmbeddingSource(tmp_path / "part")
    write_store(tmp_path / "nocap", np.eye(3, D), list("abc"))
    with pytest.raises(ValueError, match="captions"):
        EmbeddingSource(tmp_path / "nocap")
    dm = _dm(root, clip_tokenizer)
    with pytest.raises(ValueError, match="image_tower=precomputed"):
        dm.configure(data_config=DataConfig(image_size=(32, 32)))
    with pytest.raises(ValueError, match=f"image_tower.dim={D}"):
        dm.configure(data_config=PrecomputedTower(D + 1).data_config)
    dm.configure(data_config=PrecomputedTower(D).data_config)  # the right one passes


def test_lit_steps_train_only_the_text_side(store, clip_tokenizer):
    from mmclip.tasks.contrastive import ContrastiveTask

    root, rows = store
    task = ContrastiveTask(
        model=None,
        image_tower={"name": "precomputed", "dim": D},
        text_tower={"name": "clip_text", "width": 32, "heads": 2, "layers": 1, "context_length": 16},
        model_kwargs={"embed_dim": D, "image_proj": "none"},
        optimizer={"lr": 1e-2},
        scheduler={"name": None},
    )
    dm = _dm(root, None)
    dm.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    trainer.fit(task, datamodule=dm)
    after = task.model.state_dict()
    assert not any(k.startswith(("image_tower.", "image_proj.")) for k in after)  # nothing on the image side
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert any(k.startswith("text_tower.") for k in moved) and "text_proj.weight" in moved
    batch = next(iter(dm.retrieval_dataloader("val")))
    image = task.model.eval().encode_image(batch.images, normalize=True)
    expected = torch.nn.functional.normalize(
        torch.from_numpy(np.stack([rows[k] for k in batch.keys])), dim=-1
    )
    torch.testing.assert_close(image, expected, rtol=0, atol=0)
