"""The synthetic shapes data set: determinism, held-out classes, captions, rendering, writers, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from mmclip.data import synthetic
from mmclip.data.synthetic import (
    CLASSNAMES,
    COLORS,
    HELD_OUT_CLASSES,
    HELD_OUT_PAIRS,
    SHAPES,
    TEMPLATES,
    SyntheticDataModule,
    SyntheticShapes,
    render,
)
from mmclip.towers.base import DataConfig


def _digest(ds: SyntheticShapes, indices) -> str:
    h = hashlib.sha256()
    for i in indices:
        raw = ds.get(i)
        h.update(raw.image.tobytes())
        h.update("|".join(raw.captions).encode())
    return h.hexdigest()


def test_classes_and_held_out_pairs():
    assert len(CLASSNAMES) == len(COLORS) * len(SHAPES) == 30
    assert len(HELD_OUT_CLASSES) == 6 == round(0.2 * len(CLASSNAMES))
    assert sorted(CLASSNAMES.index(f"{c} {s}") for c, s in HELD_OUT_PAIRS) == HELD_OUT_CLASSES
    assert {c for c, _ in HELD_OUT_PAIRS} == set(COLORS)  # each colour loses exactly one partner
    assert {s for _, s in HELD_OUT_PAIRS} == set(SHAPES)
    assert all("{}" in t for t in TEMPLATES)


def test_held_out_pairs_never_in_train_but_in_val():
    train = SyntheticShapes("train", 3000)
    seen = {(o.colour, o.shape) for i in range(len(train)) for o in train.scene(i).objects}
    assert not seen & set(HELD_OUT_PAIRS)
    assert seen == {(c, s) for c in COLORS for s in SHAPES} - set(HELD_OUT_PAIRS)
    val = SyntheticShapes("val", 500)
    val_pairs = {(o.colour, o.shape) for i in range(len(val)) for o in val.scene(i).objects}
    assert set(HELD_OUT_PAIRS) <= val_pairs
    counts = np.bincount([len(train.scene(i).objects) for i in range(1000)], minlength=4)
    assert counts[0] == 0 and all(counts[1:] > 150)


def test_deterministic_and_split_dependent():
    a, b = SyntheticShapes("train", 50, image_size=32), SyntheticShapes("train", 50, image_size=32)
    assert _digest(a, range(50)) == _digest(b, range(50))
    assert _digest(a, [3]) == _digest(b, [3])  # random access gives the same sample
    assert _digest(SyntheticShapes("val", 50, image_size=32), range(5)) != _digest(a, range(5))
    assert _digest(SyntheticShapes("train", 50, image_size=32, seed=1), range(5)) != _digest(a, range(5))


@pytest.mark.slow  # a fresh interpreter importing mmclip: ~5-10 s on the shared 2-core machine
def test_same_samples_in_a_fresh_process():
    code = (
        "from mmclip.data.synthetic import SyntheticShapes; import hashlib; ds = SyntheticShapes('test', 20, 32);"
        "h = hashlib.sha256(); [h.update(ds.get(i).image.tobytes() + '|'.join(ds.get(i).captions).encode()) "
        "for i in (0, 7, 19)]; print(h.hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == _digest(SyntheticShapes("test", 20, 32), (0, 7, 19))


def test_captions_name_every_object_with_natural_articles():
    ds = SyntheticShapes("val", 300)
    for i in range(len(ds)):
        scene, raw = ds.scene(i), ds.get(i)
        assert len(raw.captions) == 5 and len(set(raw.captions)) >= 4
        for caption in raw.captions:
            for o in scene.objects:
                assert f"{o.colour} {o.shape}" in caption
            assert not re.search(r"\ba [aeiou]", caption) and not re.search(r"\ban [^aeiou]", caption), (
                caption
            )
        assert raw.label == (scene.objects[0].label if len(scene.objects) == 1 else -1)


def test_relations_and_places_are_true():
    ds = SyntheticShapes("train", 400)
    for i in range(len(ds)):
        scene = ds.scene(i)
        if len(scene.objects) != 2:
            continue
        a, b = scene.objects
        for caption in ds.get(i).captions:
            m = re.search(
                r"(\w+ \w+) (to the left of|to the right of|above|below) (?:a|an|the) (?:\w+ )?(\w+ \w+)$",
                caption,
            )
            if m and m.group(1) == f"{a.colour} {a.shape}":
                rel = m.group(2)
                assert (rel != "to the left of" or a.col < b.col) and (
                    rel != "to the right of" or a.col > b.col
                )
                assert (rel != "above" or a.row < b.row) and (rel != "below" or a.row > b.row)


def test_render_draws_the_scene():
    ds = SyntheticShapes("train", 100, image_size=64)
    for i in range(100):
        scene = ds.scene(i)
        arr = np.asarray(render(scene, 64)).astype(int)
        for o in scene.objects:
            pixel = arr[int(o.cy * 64), int(o.cx * 64)]
            assert np.abs(pixel - np.array(o.rgb)).max() <= 8 + 1, (i, o)
        assert np.abs(arr[0, 0] - np.array(scene.background)).max() <= 8 or len(scene.objects) > 0


def test_render_speed():
    ds = SyntheticShapes("train", 400, image_size=64)
    scenes = [ds.scene(i) for i in range(400)]
    start = time.perf_counter()
    for s in scenes:
        render(s, 64)
    per_image = (time.perf_counter() - start) / len(scenes)
    assert per_image < 1e-3, f"{per_image * 1e3:.3f} ms per 64 px image"  # ~0.04 ms when the machine is idle


def test_classification_samples():
    ds = SyntheticShapes("test", 60, kind="classification")
    labels = [ds.get(i).label for i in range(60)]
    assert labels == [i % 30 for i in range(60)]
    assert all(len(ds.scene(i).objects) == 1 for i in range(60))
    held = SyntheticShapes("test", 12, kind="classification", classes="held_out")
    assert sorted({held.get(i).label for i in range(12)}) == HELD_OUT_CLASSES
    with pytest.raises(ValueError, match="held-out"):
        SyntheticShapes("train", 10, kind="classification", classes="held_out")


def test_writers_round_trip(tmp_path):
    paths = synthetic.write_all(tmp_path, n=12, n_val=4, n_test=3, shard_size=5, image_size=16)
    ds = SyntheticShapes("train", 12, image_size=16)
    shards = paths["wds"]["train"]
    assert [os.path.basename(p) for p in shards] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    sizes = json.loads((tmp_path / "wds" / "sizes.json").read_text())
    assert sizes["train-000000.tar"] == 5 and sizes["train-000002.tar"] == 2 and sizes["val-000000.tar"] == 4
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("train-00000001.json"))
    assert names[:3] == ["train-00000000.png", "train-00000000.txt", "train-00000000.json"]
    assert meta["captions"] == ds.get(1).captions and meta["label"] == ds.get(1).label

    import datasets

    hf = datasets.load_from_disk(str(tmp_path / "hf"))
    assert set(hf) == {"train", "val", "test"} and hf["train"]["captions"][2] == ds.get(2).captions
    assert np.array_equal(np.asarray(hf["train"][2]["image"]), np.asarray(ds.get(2).image))
    lines = (tmp_path / "csv" / "train.csv").read_text().splitlines()
    assert lines[0] == "filepath,caption,label" and len(lines) == 1 + 12 * 5
    assert (tmp_path / "csv" / "train" / "train-00000011.png").exists()


def test_cli(tmp_path):
    synthetic.main(
        [
            "--out",
            str(tmp_path),
            "--n",
            "6",
            "--n-val",
            "2",
            "--n-test",
            "2",
            "--formats",
            "wds,csv",
            "--image-size",
            "16",
        ]
    )
    assert sorted(os.listdir(tmp_path)) == ["csv", "wds"]
    assert (tmp_path / "wds" / "test-000000.tar").exists() and (tmp_path / "csv" / "val.csv").exists()


def test_datamodule(clip_tokenizer):
    dm = SyntheticDataModule(
        n_train=40, n_val=10, n_test=10, image_size=16, batch_size=8, num_workers=0, tokenizer=clip_tokenizer
    )
    assert (
        dm.classnames == CLASSNAMES and dm.templates == TEMPLATES and dm.held_out_classes == HELD_OUT_CLASSES
    )
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert len(loader) == 5 and batch.images.shape == (8, 3, 16, 16) and batch.input_ids.shape == (8, 77)
    assert batch.caption_image_index is None and batch.labels is None and len(batch.captions) == 8
    val = list(dm.val_dataloader())
    assert [len(b) for b in val] == [8, 2] and val[0].input_ids.shape[0] == 40
    assert val[0].caption_image_index.tolist() == [i // 5 for i in range(40)]
    cls = list(dm.classification_dataloader("test"))
    assert torch_cat([b.labels for b in cls]).tolist() == list(range(10))
    dm.configure(data_config=DataConfig(image_size=(24, 24), mean=(0.5,) * 3, std=(0.5,) * 3))
    assert next(iter(dm.train_dataloader())).images.shape == (8, 3, 24, 24)
    held = SyntheticDataModule(
        n_train=8,
        n_test=6,
        image_size=16,
        tokenizer=clip_tokenizer,
        num_workers=0,
        classification_classes="held_out",
    )
    labels = torch_cat([b.labels for b in held.classification_dataloader()]).tolist()
    assert labels == HELD_OUT_CLASSES


def torch_cat(tensors):
    import torch

    return torch.cat(tensors)


def test_count_labels(clip_tokenizer):
    """scene_label="count": label = number of shapes - 1 everywhere; the default is unchanged."""
    from mmclip.data.synthetic import COUNT_CLASSNAMES, COUNT_PROBS

    plain = SyntheticShapes("train", 200, image_size=16)
    counted = SyntheticShapes("train", 200, image_size=16, scene_label="count")
    counts = []
    for i in range(200):
        a, b = plain.get(i), counted.get(i)
        n = len(plain.scene(i).objects)
        counts.append(n)
        assert b.label == n - 1 and a.key == b.key and a.captions == b.captions
        assert a.label == (plain.scene(i).objects[0].label if n == 1 else -1)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    freq = np.bincount(counts, minlength=4)[1:] / 200
    assert np.abs(freq - np.array(COUNT_PROBS)).max() < 0.1
    with pytest.raises(ValueError, match="scene_label"):
        SyntheticShapes("train", 5, scene_label="area")
    with pytest.raises(ValueError, match="kind='scenes'"):
        SyntheticShapes("test", 5, kind="classification", scene_label="count")

    dm = SyntheticDataModule(
        n_train=40,
        n_val=0,
        n_test=12,
        image_size=16,
        batch_size=8,
        num_workers=0,
        tokenizer=clip_tokenizer,
        scene_label="count",
    )
    assert dm.classnames == COUNT_CLASSNAMES and dm.held_out_classes == []
    source = SyntheticShapes("train", 40, image_size=16)
    for batch in dm.train_dataloader():
        index = [int(k.split("-")[1]) for k in batch.keys]
        assert batch.labels.tolist() == [len(source.scene(i).objects) - 1 for i in index]
    test = SyntheticShapes("test", 12, image_size=16)
    cls = list(dm.classification_dataloader("test"))
    assert [k for b in cls for k in b.keys] == [test.key(i) for i in range(12)]  # scenes, not single shapes
    assert torch_cat([b.labels for b in cls]).tolist() == [len(test.scene(i).objects) - 1 for i in range(12)]
