"""CaptioningTask: the loss covers exactly the caption tokens, training moves it, checkpoints rebuild it,
freezing holds, and the report scores what it is given.

References: the loss is recomputed row by row on unpadded sequences with F.cross_entropy; token ids come from
the Hugging Face tokenizer's own ``encode``; report metrics are checked on hand-made captions whose right
answers are known; frozen weights are compared bit for bit with a copy taken before training.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from mmclip.data import SyntheticDataModule
from mmclip.data.synthetic import CLASSNAMES, HELD_OUT_CLASSES, HELD_OUT_PAIRS, SHAPES
from mmclip.models.caption_prefix import IGNORE_INDEX, build_caption_labels, build_caption_targets
from mmclip.models.factory import create_model
from mmclip.tasks import captioning
from mmclip.tasks.captioning import CaptioningTask, train_caption_tokenizer

TOWER = {"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
CNN = {"name": "timm", "model_name": "test_resnet", "image_size": 32}  # BatchNorm: buffers that could drift
LM = {
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 48,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
BPE = {"kind": "bpe", "vocab_size": 384, "num_scenes": 100}
CAPTIONS = [
    "a red circle",
    "there is a large blue square in the top left corner",
    "a cross",
    "the small star",
]


@pytest.fixture(scope="module")
def tokenizer_state():
    return train_caption_tokenizer(vocab_size=384, num_scenes=100)


def make_task(tokenizer_state=None, seed: int = 0, **kwargs) -> CaptioningTask:
    torch.manual_seed(seed)
    kwargs.setdefault("image_encoder", TOWER)
    kwargs.setdefault("freeze_image", False)
    kwargs.setdefault("mapper", {"kind": "mlp", "prefix_length": 3})
    kwargs.setdefault("lm", dict(LM))
    kwargs.setdefault("optimizer", {"lr": 3e-3, "weight_decay": 0.0})
    kwargs.setdefault("scheduler", {"name": None})
    if tokenizer_state is not None:
        kwargs.setdefault("tokenizer_state", tokenizer_state)
    return CaptioningTask(**kwargs)


def data(n_test: int = 12, **kwargs) -> SyntheticDataModule:
    kwargs.setdefault("train_shapes", "single")
    return SyntheticDataModule(
        n_train=64, n_val=0, n_test=n_test, image_size=32, batch_size=8, num_workers=0, **kwargs
    )


class FixedBatch(pl.LightningDataModule):
    """The same training batch, ``steps`` times."""

    def __init__(self, batch, steps: int) -> None:
        super().__init__()
        self.batch, self.steps = batch, steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * self.steps, batch_size=None, collate_fn=lambda b: b)


def fit(task, datamodule, steps: int) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(task, datamodule=datamodule)
    return trainer


def first_batch(task, **kwargs):
    dm = data(**kwargs)
    dm.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    return next(iter(dm.train_dataloader()))


# ---- tokenizer ---------------------------------------------------------------------------------
def test_trained_tokenizer_is_deterministic_and_feeds_the_data_module(tokenizer_state):
    assert train_caption_tokenizer(vocab_size=384, num_scenes=100) == tokenizer_state
    task = make_task(tokenizer_state)
    hf = task.caption_tokenizer.tokenizer
    ids = task.tokenizer(CAPTIONS)  # (N, max_caption_length)
    assert ids.shape == (len(CAPTIONS), task.hparams.max_caption_length) and ids.dtype == torch.long
    for row, caption in zip(ids.tolist(), CAPTIONS, strict=True):
        expected = hf.encode(caption, add_special_tokens=False) + [hf.eos_token_id]
        assert row[: len(expected)] == expected
        assert set(row[len(expected) :]) == {hf.pad_token_id}
    assert hf.pad_token_id != hf.eos_token_id
    assert hf.decode(hf.encode(CAPTIONS[1], add_special_tokens=False)) == CAPTIONS[1]
    # every word of the synthetic captions is one token (the vocabulary is large enough)
    assert len(hf.encode("a small purple diamond", add_special_tokens=False)) == 4


# ---- the training data the recipe uses -----------------------------------------------------------
@pytest.mark.parametrize("shapes", ["single", "mix"])
def test_train_shapes_option_of_the_synthetic_data(shapes):
    dm = SyntheticDataModule(n_train=60, n_val=0, n_test=0, num_workers=0, train_shapes=shapes)
    source = dm._source("train")
    counts = [len(source.scene(i).objects) for i in range(len(source))]
    keys = [source.get(i).key for i in range(len(source))]
    assert len(set(keys)) == len(keys) == 60
    pairs = {(o.colour, o.shape) for i in range(len(source)) for o in source.scene(i).objects}
    assert not pairs & set(HELD_OUT_PAIRS)  # training never shows a held-out pair
    if shapes == "single":
        assert set(counts) == {1} and len(pairs) == 24  # every seen class, one shape per image
    else:  # scenes (1-3 shapes) at even indices, single shapes at odd ones
        assert set(counts[1::2]) == {1} and max(counts[0::2]) > 1
    with pytest.raises(ValueError, match="train_shapes"):
        SyntheticDataModule(train_shapes="pairs")


# ---- the loss ----------------------------------------------------------------------------------
def test_labels_mask_exactly_the_prefix_and_the_padding(tokenizer_state):
    task = make_task(tokenizer_state)
    k = task.model.prefix_length
    hf = task.caption_tokenizer.tokenizer
    rows = [hf.encode(c, add_special_tokens=False) + [hf.eos_token_id] for c in CAPTIONS]
    ids, mask = build_caption_targets(task.caption_tokenizer, CAPTIONS, task.hparams.max_caption_length)
    length = max(map(len, rows))
    labels = build_caption_labels(ids, mask, k)
    assert labels.shape == (len(rows), k + length)
    for i, row in enumerate(rows):
        assert labels[i].tolist() == [IGNORE_INDEX] * k + row + [IGNORE_INDEX] * (length - len(row))


def test_the_task_loss_is_cross_entropy_on_caption_tokens_only(tokenizer_state):
    task = make_task(tokenizer_state).eval()
    k = task.model.prefix_length
    hf = task.caption_tokenizer.tokenizer
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = task(images, CAPTIONS)
        # reference: each caption alone, no padding, no mask; its tokens (eos included) predicted from t - 1
        prefix = task.model.encode_prefix(images)  # (B, k, E)
        wte = task.model.lm.get_input_embeddings()
        terms = []
        for i, caption in enumerate(CAPTIONS):
            row = torch.tensor(hf.encode(caption, add_special_tokens=False) + [hf.eos_token_id])
            embeds = torch.cat([prefix[i], wte(row)])[None]  # (1, k + n, E)
            logits = task.model.lm(inputs_embeds=embeds).logits[0]  # (k + n, V)
            terms.append(F.cross_entropy(logits[k - 1 : k - 1 + len(row)], row, reduction="none"))
        expected = torch.cat(terms).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_loss_is_finite_and_decreases_on_a_fixed_batch(tokenizer_state):
    task = make_task(tokenizer_state, optimizer={"lr": 1e-2, "weight_decay": 0.0})
    batch = first_batch(task)
    assert len(batch.captions) == len(batch)  # one caption per image
    with torch.no_grad():
        before = task(batch.images, batch.captions).item()
    fit(task, FixedBatch(batch, 12), steps=12)
    task.eval()
    with torch.no_grad():
        after = task(batch.images, batch.captions).item()
    assert torch.isfinite(torch.tensor([before, after])).all()
    assert after < 0.6 * before, (before, after)


# ---- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_round_trip_rebuilds_the_tokenizer_and_gives_identical_captions(tmp_path, monkeypatch):
    task = make_task(tokenizer=BPE)  # the task trains its own tokenizer
    assert task.hparams.tokenizer_state is not None
    dm = data()
    dm.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    trainer = fit(task, dm, steps=3)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)

    def no_training(*args, **kwargs):
        raise AssertionError("a checkpoint must not train its tokenizer again")

    monkeypatch.setattr(captioning, "train_caption_tokenizer", no_training)
    loaded = CaptioningTask.load_from_checkpoint(path, weights_only=True)
    assert (
        torch.load(path, weights_only=True)["hyper_parameters"]["tokenizer_state"]
        == task.hparams.tokenizer_state
    )
    a, b = task.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    for caption in CAPTIONS:
        assert loaded.caption_tokenizer.encode(caption) == task.caption_tokenizer.encode(caption)
    images = next(iter(dm.classification_dataloader("test"))).images
    task.eval()
    loaded.eval()
    for strategy in ("greedy", "beam"):
        ids_a = task.model.generate_ids(images, strategy=strategy, max_new_tokens=12, num_beams=3)
        ids_b = loaded.model.generate_ids(images, strategy=strategy, max_new_tokens=12, num_beams=3)
        assert ids_a == ids_b
        assert task.caption(images, strategy=strategy) == loaded.caption(images, strategy=strategy)


# ---- freezing and pretrained weights -----------------------------------------------------------
@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_image_encoder_stays_bit_identical(tokenizer_state, frozen):
    task = make_task(tokenizer_state, image_encoder=CNN, freeze_image=frozen, optimizer={"lr": 1e-2})
    before = {k: v.clone() for k, v in task.model.image_encoder.state_dict().items()}
    mapper = {k: v.clone() for k, v in task.model.mapper.state_dict().items()}
    dm = data()
    dm.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    fit(task, dm, steps=3)
    after = task.model.image_encoder.state_dict()
    same = [k for k in before if torch.equal(before[k], after[k])]
    if frozen:  # weights and BatchNorm statistics alike
        assert same == list(before)
    else:
        assert len(same) < len(before) // 4  # the check could fail: training does move a trainable tower
    assert not any(torch.equal(v, task.model.mapper.state_dict()[k]) for k, v in mapper.items())


def test_pretrained_image_weights_load_at_fit_start(tmp_path, tokenizer_state):
    source = create_model("tiny-vit")
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    task = make_task(tokenizer_state, image_encoder="tiny-vit", image_pretrained=str(path), freeze_image=True)
    tower = task.model.image_encoder.tower
    assert not torch.equal(tower.pos_embed, source.image_tower.pos_embed)
    dm = data()
    dm.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    fit(task, dm, steps=1)
    for key, value in source.image_tower.state_dict().items():
        assert torch.equal(tower.state_dict()[key], value), key
    assert torch.equal(task.model.image_encoder.proj.weight, source.image_proj.weight)
    with pytest.raises(ValueError, match="model source or a DualEncoder"):
        make_task(tokenizer_state, image_encoder=TOWER, image_pretrained=str(path))


def test_image_lr_applies_to_the_image_encoder(tokenizer_state):
    task = make_task(tokenizer_state)
    from mmclip.tasks.optim import build_optimizer

    opt = build_optimizer(task.model, lr=1e-3, image_lr=1e-5)
    image = {id(p) for p in task.model.image_encoder.parameters()}
    for group in opt.param_groups:
        in_image = {id(p) in image for p in group["params"]}
        assert len(in_image) == 1
        assert group["lr"] == (1e-5 if in_image.pop() else 1e-3)


def test_unknown_spec_keys_are_errors(tokenizer_state):
    with pytest.raises(ValueError, match="unknown mapper keys"):
        make_task(tokenizer_state, mapper={"kind": "mlp", "prefix_len": 4})
    with pytest.raises(ValueError, match="unknown tokenizer keys"):
        make_task(tokenizer={"kind": "bpe", "vocab": 300})


# ---- the report --------------------------------------------------------------------------------
def test_report_scores_single_shapes_held_out_pairs_and_scenes(tmp_path, tokenizer_state):
    task = make_task(tokenizer_state, evaluation={"num_samples": 5})
    dm = data(n_test=30)  # 30 single-shape test images: each class once
    dm.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    labels = torch.cat([b.labels for b in dm.classification_dataloader("test")]).tolist()
    scene_refs = [refs for b in dm.retrieval_dataloader("test") for refs in _first_captions(b)]
    held = {CLASSNAMES.index(f"{c} {s}") for c, s in HELD_OUT_PAIRS}
    assert set(labels) == set(range(30)) and held == set(HELD_OUT_CLASSES)

    def answer(label: int) -> str:  # right for seen pairs; held-out pairs get the wrong shape
        colour, shape = CLASSNAMES[label].split()
        if label in held:
            shape = next(s for s in SHAPES if s != shape)
        return f"a small {colour} {shape} in the center"

    # scenes: the first half gets its own reference caption (names every object), the rest nothing useful
    scene_answers = [ref if i < len(scene_refs) // 2 else "a picture" for i, ref in enumerate(scene_refs)]
    queue = [answer(y) for y in labels] + scene_answers

    def fake_caption(images, strategy="greedy", **kwargs):
        out = queue[: len(images)]
        del queue[: len(images)]
        return out

    task.caption = fake_caption
    report = task.report(dm, tmp_path / "report")
    m = report["metrics"]
    assert not queue
    assert m["caption/attribute_accuracy"] == pytest.approx(24 / 30)
    assert m["caption/attribute_accuracy_exact"] == pytest.approx(24 / 30)
    assert m["caption/seen_attribute_accuracy"] == 1.0 and m["caption/held_out_attribute_accuracy"] == 0.0
    assert m["caption/num_images"] == 30 and m["caption/num_held_out_images"] == 6
    assert m["caption_scenes/attribute_accuracy"] == pytest.approx((len(scene_refs) // 2) / len(scene_refs))
    assert m["caption_scenes/rougeL"] > 0.5 and 0.0 <= m["caption/bleu4"] <= 1.0
    value, target, ok = report["checks"]["caption/attribute_accuracy"]
    assert (target, ok, report["passed"]) == (0.8, value >= 0.8, ok)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["metrics"] == m and saved["passed"] == report["passed"]
    samples = [json.loads(line) for line in (tmp_path / "report" / "samples.jsonl").read_text().splitlines()]
    assert [s["set"] for s in samples] == ["single"] * 5 + ["scenes"] * 5
    assert samples[0]["caption"] == answer(labels[0]) and samples[0]["truth"] == CLASSNAMES[labels[0]]


def _first_captions(batch) -> list[str]:
    first: dict[int, str] = {}
    for caption, row in zip(batch.captions, batch.text_to_image.tolist(), strict=True):
        first.setdefault(row, caption)
    return [first[r] for r in range(len(batch))]


def test_report_on_a_trained_task_runs_real_generation(tmp_path, tokenizer_state):
    task = make_task(tokenizer_state, evaluation={"max_images": 8, "max_new_tokens": 6})
    dm = data(n_test=8)
    dm.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    report = task.report(dm, tmp_path)
    assert (
        report["metrics"]["caption/num_images"] == 8 and report["metrics"]["caption_scenes/num_images"] == 8
    )
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(isinstance(s["caption"], str) and len(s["caption"].split()) <= 6 for s in samples)
