"""NaFlex training data: wide and tall synthetic scenes, the NaFlex training transform, fixed and budget batches
(exactly once, exact resume, ranks), square crops for the same tower, and batches the tower takes."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest
import torch

import mmclip
from mmclip.data.collate import collate, concat_batches, slice_batch
from mmclip.data.naflex import NaFlexImages, NaFlexPreprocess, collate_images, naflex_size
from mmclip.data.synthetic import ASPECTS, SyntheticShapes, render
from mmclip.data.synthetic_module import SyntheticDataModule
from mmclip.data.transforms import ImageTransform, image_transform

# tiny-naflex: patch 8, at most 16 patches per image (192 values each)


@pytest.fixture(scope="module")
def model():
    return mmclip.create_model("tiny-naflex")


def _data(model, tok, **kw):
    kw.setdefault("batch_size", 6)
    kw.setdefault("n_train", 60)
    data = SyntheticDataModule(n_val=10, n_test=12, image_size=32, num_workers=kw.pop("workers", 0),
                               tokenizer=tok, aspect=kw.pop("aspect", "varied"), **kw)
    return data.configure(data_config=model.data_config)


# ---- wide and tall scenes --------------------------------------------------------------------------------
def _ink(image) -> np.ndarray:
    """(H, W) bool: pixels far from the light, noisy background (shape pixels)."""
    arr = np.asarray(image).astype(int)
    return (arr.max(-1) - arr.min(-1) > 60) | (arr.max(-1) < 150)


def test_varied_scenes_have_their_aspect_and_put_each_shape_in_its_cell():
    ds = SyntheticShapes("train", 90, image_size=32, aspect="varied")
    kinds = collections.Counter()
    for i in range(90):
        scene = ds.scene(i)
        image = ds.get(i).image
        w, h = image.size
        assert min(w, h) == 32 and scene.size(32) == (w, h)
        kind = "square" if w == h else "wide" if w > h else "tall"
        kinds[kind] += 1
        if kind == "square":
            continue
        assert max(w, h) / min(w, h) in (2, 3)
        ink = _ink(image)
        for o in scene.objects:  # each shape's pixels lie in its third of the long side, where its place says
            cell = o.col if kind == "wide" else o.row
            assert o.place in {"on the left", "in the center", "on the right"} if kind == "wide" else {
                "at the top", "in the center", "at the bottom"}
            lo, hi = cell * max(w, h) / 3, (cell + 1) * max(w, h) / 3
            band = ink[:, int(lo):int(hi)] if kind == "wide" else ink[int(lo):int(hi), :]
            assert band.sum() > 20, (i, o)
        cells = {o.col if kind == "wide" else o.row for o in scene.objects}
        for empty in {0, 1, 2} - cells:  # no ink in cells without a shape
            lo, hi = empty * max(w, h) / 3 + 2, (empty + 1) * max(w, h) / 3 - 2
            band = ink[:, int(lo):int(hi)] if kind == "wide" else ink[int(lo):int(hi), :]
            assert band.sum() == 0, (i, empty)
    assert min(kinds.values()) > 15, kinds


def test_a_centre_crop_cuts_away_the_shapes_at_the_ends_of_wide_and_tall_images():
    ds = SyntheticShapes("test", 60, image_size=32, kind="classification", aspect="wide_tall")
    crop = ImageTransform((32, 32), (0, 0, 0), (1, 1, 1), resize_mode="shortest")
    at_ends = 0
    for i in range(60):
        (o,) = ds.scene(i).objects
        image = ds.get(i).image
        assert image.width != image.height
        if o.place != "in the center":
            at_ends += 1
            kept = _ink(crop._resize_crop(image)).sum() / _ink(image).sum()
            assert kept < (0.02 if max(image.size) == 3 * 32 else 0.35), (i, kept)  # 3:1 all, 2:1 most cut away
    assert 30 < at_ends < 50  # a shape at either end two times in three


def test_aspect_is_checked_and_square_is_the_default():
    with pytest.raises(ValueError, match="aspect must be one of"):
        SyntheticShapes("train", 4, aspect="round")
    a, b = SyntheticShapes("train", 8, 32), SyntheticShapes("train", 8, 32, aspect="square")
    assert all(a.get(i).image.tobytes() == b.get(i).image.tobytes() for i in range(8))
    assert set(ASPECTS) == {"square", "varied", "wide_tall"}
    assert render(a.scene(0), 32).size == (32, 32)


# ---- the NaFlex training transform -----------------------------------------------------------------------
def test_training_transform_keeps_the_aspect_ratio_and_the_budget():
    wide = SyntheticShapes("train", 30, image_size=32, aspect="wide_tall")
    t = NaFlexPreprocess(patch_size=8, max_num_patches=16, train=True, scale=(0.8, 1.0))
    for i in range(30):
        image = wide.get(i).image
        sample = t(image, random.Random(i))
        rows, cols = sample.grid
        assert rows * cols <= 16 and sample.patches.shape == (rows * cols, 8 * 8 * 3)
        assert (cols > rows) == (image.width > image.height)  # wide stays wide, tall stays tall
        again = t(image, random.Random(i))
        assert torch.equal(again.patches, sample.patches)  # the sample's rng decides the crop
        small = t(image, random.Random(i), 8)
        assert small.grid[0] * small.grid[1] <= 8
    evaluation = NaFlexPreprocess(patch_size=8, max_num_patches=16)
    image = wide.get(0).image
    assert evaluation(image).grid == tuple(d // 8 for d in naflex_size(image.height, image.width, 8, 16))


def test_image_transform_gives_a_naflex_towers_preprocessing(model):
    for train in (False, True):
        t = image_transform(model.data_config, train=train)
        assert isinstance(t, NaFlexPreprocess) and t.train == train and t.max_num_patches == 16
    _, train_pp, pp = mmclip.create_model_and_transforms("tiny-naflex")
    assert isinstance(train_pp, NaFlexPreprocess) and train_pp.train and not pp.train
    empty = pp.empty_images()
    assert len(empty) == 0 and empty.patches.shape == (0, 16, 192)


# ---- batches ---------------------------------------------------------------------------------------------
def test_concat_and_slice_of_naflex_batches_equal_collating_the_samples(model, clip_tokenizer):
    data = _data(model, clip_tokenizer)
    proc = data._processor(train=False)
    source = data._source("val")
    samples = [proc(source.get(i)) for i in range(7)]
    whole = collate(samples, clip_tokenizer)
    parts = [collate(samples[:3], clip_tokenizer, pad_to=16), collate(samples[3:], clip_tokenizer)]
    joined = concat_batches([slice_batch(p, 0, len(p)) for p in parts])
    n = whole.images.patches.shape[1]
    assert torch.equal(joined.images.patches[:, :n], whole.images.patches)
    assert torch.equal(joined.images.mask[:, :n], whole.images.mask) and not joined.images.mask[:, n:].any()
    assert torch.equal(joined.images.grid, whole.images.grid) and joined.keys == whole.keys
    from torchvision.transforms.v2 import functional as tvf

    for i in range(7):  # image() puts a row's patches back in place: the resized, normalised image
        rows, cols = samples[i].image.grid
        pixels = torch.from_numpy(np.array(source.get(i).image)).permute(2, 0, 1)
        resized = tvf.resize(pixels, [rows * 8, cols * 8], interpolation=tvf.InterpolationMode.BILINEAR, antialias=True)
        expected = tvf.normalize(resized.float(), [127.5] * 3, [127.5] * 3)
        torch.testing.assert_close(whole.images.image(i), expected, rtol=0, atol=1e-5)
        assert torch.equal(collate_images([samples[i].image]).patches[0], samples[i].image.patches)


def test_fixed_batches_pad_every_image_to_the_budget_and_the_tower_takes_them(model, clip_tokenizer):
    loader = _data(model, clip_tokenizer).train_dataloader(0, 1)
    batches = list(loader)
    assert len(batches) == 10
    for b in batches:
        assert isinstance(b.images, NaFlexImages) and b.images.patches.shape == (6, 16, 192)
        assert torch.equal(b.images.mask.sum(1), b.images.grid.prod(1))
    out = model.encode_image(batches[0].images)
    assert out.shape == (6, 64) and torch.isfinite(out).all()


def _budget(model, tok, **kw):
    return _data(model, tok, naflex_batching="budget", naflex_seq_lens=[4, 8, 16], **kw)


def test_budget_batches_hold_the_patch_budget_and_cover_the_epoch_once(model, clip_tokenizer):
    loader = _budget(model, clip_tokenizer).train_dataloader(0, 1)
    assert loader.token_budget == 6 * 16
    keys, sizes = [], set()
    for _ in range(2):  # two epochs: the same plan, another order
        epoch = list(loader)
        assert len(epoch) == len(loader)
        seen = []
        for b, (seq_len, n) in zip(epoch, loader.plan, strict=True):
            seen += b.keys
            if len(b):
                assert b.images.patches.shape[1] == seq_len and b.images.patches.shape[0] <= n
                assert (b.images.grid.prod(1) <= seq_len).all()
                assert b.images.patches.shape[0] * seq_len <= loader.token_budget
                sizes.add(len(b))
        assert sorted(seen) == sorted(f"train-{i:08d}" for i in range(60))  # every sample once
        keys.append(seen)
    assert keys[0] != keys[1] and {6, 12, 24} & sizes and len(sizes) > 1  # variable images per batch


@pytest.mark.parametrize("workers", [0, 2])
def test_budget_resume_is_exact(model, clip_tokenizer, workers):
    make = lambda: _budget(model, clip_tokenizer, workers=workers).train_dataloader(0, 1)  # noqa: E731
    loader = make()
    reference = list(loader) + list(loader)  # two epochs
    first = make()
    it = iter(first)
    got = [next(it) for _ in range(2)]
    state = first.state_dict()
    assert state["consumed"] == 2 and len(first) > 2
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)  # the rest of the epoch, then the next
    for x, y in zip(got + rest, reference, strict=True):
        assert x.keys == y.keys and torch.equal(x.images.patches, y.images.patches)
        assert torch.equal(x.input_ids, y.input_ids)


def test_budget_ranks_split_the_epoch_with_the_same_number_of_batches(model, clip_tokenizer):
    data = _budget(model, clip_tokenizer)
    a, b = data.train_dataloader(0, 2), data.train_dataloader(1, 2)
    ka = [k for batch in a for k in batch.keys]
    kb = [k for batch in b for k in batch.keys]
    assert len(a) == len(b) and not set(ka) & set(kb) and len(ka) + len(kb) == 60


def test_budget_batching_is_refused_for_streams_and_checked(model, clip_tokenizer, tmp_path):
    from mmclip.data.wds import WebDatasetDataModule
    from mmclip.data.writers import write_shards

    write_shards(SyntheticShapes("train", 8, image_size=16), tmp_path, "train", shard_size=8)
    wds = WebDatasetDataModule(train_shards=str(tmp_path / "train-000000.tar"), tokenizer=clip_tokenizer,
                               batch_size=4, num_workers=0, naflex_batching="budget")
    wds.configure(data_config=model.data_config)
    with pytest.raises(ValueError, match="needs map-style data"):
        wds.train_dataloader(0, 1)
    fixed = WebDatasetDataModule(train_shards=str(tmp_path / "train-000000.tar"), tokenizer=clip_tokenizer,
                                 batch_size=4, num_workers=0).configure(data_config=model.data_config)
    batch = next(iter(fixed.train_dataloader(0, 1)))  # streamed shards give fixed NaFlex batches
    assert batch.images.patches.shape == (4, 16, 192)
    with pytest.raises(ValueError, match="naflex_batching must be one of"):
        SyntheticDataModule(naflex_batching="packed")


def test_naflex_false_gives_the_same_tower_square_centre_crops(model, clip_tokenizer):
    data = _data(model, clip_tokenizer, naflex=False)
    batch = next(iter(data.train_dataloader(0, 1)))
    assert isinstance(batch.images, torch.Tensor) and batch.images.shape == (6, 3, 32, 32)
    evaluation = data.transform(train=False)
    assert isinstance(evaluation, ImageTransform) and evaluation.resize_mode == "shortest"
    assert model.encode_image(batch.images).shape == (6, 64)
    fixed_size = mmclip.create_model("tiny-vit")  # a fixed-size tower's data is not affected
    other = _data(fixed_size, clip_tokenizer, max_num_patches=4)
    assert isinstance(other.transform(train=True), ImageTransform)
    budget = _data(model, clip_tokenizer, max_num_patches=9).transform(train=False)
    assert budget.max_num_patches == 9


class _Skipping:
    """A map source whose samples at ``bad`` are unusable (counted as skipped by the processor)."""

    def __init__(self, source, bad):
        self.source, self.bad = source, set(bad)

    def __len__(self):
        return len(self.source)

    def get(self, index):
        raw = self.source.get(index)
        if index in self.bad:
            raw.skip = "decode_error"
        return raw


def _skipping(model, tok, bad, rank, world):
    data = _budget(model, tok, n_train=61, max_skip_fraction=0.9)
    source = data._source
    data._source = lambda split: _Skipping(source(split), bad) if split == "train" else source(split)
    return data.train_dataloader(rank, world)


def test_budget_batches_with_skipped_samples_stay_exactly_once_on_every_rank_and_resume(model, clip_tokenizer):
    bad = {3, 17, *range(40, 51)}  # whole chunks of unusable samples too
    seen, skipped = [], 0
    for rank in range(2):
        loader = _skipping(model, clip_tokenizer, bad, rank, 2)
        reference = list(loader)
        seen += [k for b in reference for k in b.keys]
        skipped += sum(sum(b.skipped.values()) for b in reference)
        first = _skipping(model, clip_tokenizer, bad, rank, 2)
        it = iter(first)
        got = [next(it) for _ in range(len(first) - 1)]  # resume before the rank's last batch
        resumed = _skipping(model, clip_tokenizer, bad, rank, 2)
        resumed.load_state_dict(first.state_dict())
        assert [b.keys for b in got + list(resumed)] == [b.keys for b in reference]
    assert sorted(seen) == sorted(f"train-{i:08d}" for i in range(61) if i not in bad) and skipped == len(bad)


def test_a_checkpoint_of_one_batching_starts_the_next_epoch_under_the_other(model, clip_tokenizer, caplog):
    budget = _budget(model, clip_tokenizer).train_dataloader(0, 1)
    next(iter(budget))
    fixed = _data(model, clip_tokenizer).train_dataloader(0, 1)
    with caplog.at_level("WARNING"):
        fixed.load_state_dict(budget.state_dict())
    assert "layout changed" in caplog.text and fixed.state_dict()["epoch"] == 0
    batches = list(fixed)
    assert fixed.epoch == 1 and len(batches) == len(fixed)  # a whole fresh epoch


def test_budget_seq_lens_above_the_towers_budget_are_refused(model, clip_tokenizer):
    data = _data(model, clip_tokenizer, naflex_batching="budget", naflex_seq_lens=[8, 32])
    with pytest.raises(ValueError, match="raise data.max_num_patches"):
        data.train_dataloader(0, 1)


def test_frozen_featurizers_of_a_naflex_tower_take_square_tensors(model):
    from mmclip.models.featurizer import Featurizer

    featurizer = Featurizer(model)
    assert "naflex" not in featurizer.data_config.extra and "naflex" in model.data_config.extra
    transform = image_transform(featurizer.data_config, train=False)
    assert isinstance(transform, ImageTransform)
    image = SyntheticShapes("test", 1, image_size=32, aspect="wide_tall").get(0).image
    x = torch.stack([transform(image)])  # (1, 3, 32, 32): a full 4 x 4 patch grid
    out = featurizer(x)
    with torch.no_grad():
        direct = model.image_tower(x)
    torch.testing.assert_close(out.pooled, direct.pooled)
