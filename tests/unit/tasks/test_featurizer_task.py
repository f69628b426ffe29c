"""FeaturizerTask: the frozen tower stays bit-identical and gradient-free, only the resampler and head are
optimised, the loss falls on a learnable target, checkpoints round-trip, pretrained weights load."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mmclip.data.batch import ImageTextBatch
from mmclip.models.factory import get_model_config
from mmclip.models.featurizer import FrozenWeightsError
from mmclip.tasks.contrastive import ContrastiveTask
from mmclip.tasks.featurizer import FeaturizerTask
from tests.unit.tasks.fakes import FakeDataModule

TOWER = {"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
RESAMPLER = {"num_latents": 4, "depth": 1, "heads": 2, "dim_head": 16}
COLOURS = torch.tensor([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5]])  # one per class


class _Labelled(Dataset):
    """Noise images tinted by their class: a trivially learnable target."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.images = 0.5 * torch.randn(n, 3, 32, 32, generator=g) + COLOURS[self.labels][:, :, None, None]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], f"s{i}"


def _collate(items: list) -> ImageTextBatch:
    images, labels, keys = zip(*items, strict=True)
    return ImageTextBatch(
        torch.stack(images),
        torch.zeros(len(keys), 1, dtype=torch.long),
        list(keys),
        labels=torch.stack(labels),
    )


class _LabelledData(pl.LightningDataModule):
    def __init__(self, n: int = 96, batch_size: int = 16) -> None:
        super().__init__()
        self.train, self.test = _Labelled(n, 0), _Labelled(48, 1)
        self.batch_size = batch_size

    def configure(self, data_config=None, tokenizer=None) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, collate_fn=_collate)

    def classification_dataloader(
        self, split: str = "test", rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        return DataLoader(self.test, batch_size=16, collate_fn=_collate)


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _trainer(steps: int, callbacks=(), **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kw,
    )


def _task(**kw) -> FeaturizerTask:
    kw.setdefault("model", None)
    kw.setdefault("image_tower", TOWER)
    kw.setdefault("optimizer", {"lr": 3e-3, "weight_decay": 0.0})
    return FeaturizerTask(**kw)


def _tower_state(task: FeaturizerTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.featurizer.tower.state_dict().items()}


@pytest.mark.parametrize(
    "kw",
    [
        {"features": "tokens", "resampler": RESAMPLER, "head": "classify"},
        {"features": "pooled", "head": "regress", "hidden_dim": 32},
    ],
    ids=["tokens-resampler-classify", "pooled-mlp-regress"],
)
def test_fit_trains_only_the_head_and_leaves_the_tower_bit_identical(kw):
    torch.manual_seed(0)
    task = _task(**kw)
    before = _tower_state(task)
    data = _LabelledData()
    batch = next(iter(DataLoader(data.train, batch_size=96, collate_fn=_collate)))

    def loss_now() -> float:
        with torch.no_grad():
            out = task.eval()(batch.images)
        task.train()
        if kw["head"] == "classify":
            return float(F.cross_entropy(out, batch.labels))
        return float(F.mse_loss(out, batch.labels.float()))

    start = loss_now()
    losses = _Losses()
    trainer = _trainer(20, [losses])
    trainer.fit(task, datamodule=data)

    after = task.featurizer.tower.state_dict()
    assert before.keys() == after.keys() and before  # every tensor of the frozen tower, bit for bit
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    frozen = list(task.featurizer.frozen.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    out = task.featurizer(batch.images[:2])
    features = out.tokens if kw["features"] == "tokens" else out.pooled
    assert not features.requires_grad and features.grad_fn is None  # no graph through the tower
    # the optimizer holds exactly the resampler / head parameters, none of the tower's
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    trainable = {
        id(p) for m in (task.head, task.in_proj, task.resampler) if m is not None for p in m.parameters()
    }
    assert optimised == trainable and not optimised & {id(p) for p in frozen}
    assert all(p.grad is not None for p in task.head.parameters())
    # the loss falls on the learnable target
    assert loss_now() < 0.5 * start
    assert sum(losses.losses[-5:]) < sum(losses.losses[:5])
    metrics = task.evaluate(data.classification_dataloader())
    if kw["head"] == "classify":
        assert metrics["test/accuracy"] > 0.9 and metrics["test/chance_majority"] == pytest.approx(1 / 3)
    else:
        assert metrics["test/r2"] > 0.5 and metrics["test/spearman"] > 0.7
        assert metrics["test/chance_mse"] == pytest.approx(
            float(data.test.labels.float().var(unbiased=False))
        )


def test_frozen_parameter_in_the_optimizer_is_refused():
    task = _task(resampler=RESAMPLER)
    frozen = list(task.featurizer.frozen.parameters())

    def sneaky():
        return torch.optim.SGD([*task.parameters(), *frozen], lr=0.1)

    task.configure_optimizers = sneaky
    with pytest.raises(RuntimeError, match="frozen tower parameters are in the optimizer"):
        _trainer(1).fit(task, datamodule=_LabelledData())


def test_a_changed_tower_fails_at_fit_end():
    class Vandal(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            with torch.no_grad():
                next(pl_module.featurizer.frozen.parameters()).add_(1.0)

    with pytest.raises(FrozenWeightsError):
        _trainer(1, [Vandal()]).fit(_task(), datamodule=_LabelledData())


def test_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    task = _task(resampler=RESAMPLER, layer=-1)
    trainer = _trainer(3)
    trainer.fit(task, datamodule=_LabelledData())
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(
        k.startswith("featurizer.") and k != "featurizer.fingerprint" for k in state
    )  # tower not saved
    torch.manual_seed(123)  # another global random state: the tower comes back from tower_seed
    loaded = FeaturizerTask.load_from_checkpoint(path, weights_only=True)
    images = _Labelled(4, 5).images
    torch.testing.assert_close(loaded.eval()(images), task.eval()(images), rtol=0, atol=0)
    assert loaded.hparams.resampler == RESAMPLER and loaded.hparams.layer == -1
    # another frozen tower (another seed) does not match the checkpoint's fingerprint
    with pytest.raises(RuntimeError, match="fingerprint"):
        FeaturizerTask.load_from_checkpoint(path, weights_only=True, tower_seed=1)


def test_pretrained_from_a_contrastive_checkpoint(tmp_path):
    torch.manual_seed(0)
    clip = ContrastiveTask("tiny-vit", optimizer={"lr": 1e-3}, scheduler={"name": None})
    trainer = _trainer(1)
    trainer.fit(clip, datamodule=FakeDataModule(batch_size=4))
    path = tmp_path / "clip.ckpt"
    trainer.save_checkpoint(path)
    images = torch.randn(2, 3, 32, 32)
    clip.model.eval()

    bare = _task(
        image_tower=get_model_config("tiny-vit")["image_tower"], pretrained=str(path), features="pooled"
    )
    for key, value in clip.model.image_tower.state_dict().items():
        assert torch.equal(bare.featurizer.tower.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(bare.featurizer(images).pooled, clip.model.image_tower(images).pooled)

    named = _task(
        model="tiny-vit",
        image_tower=None,
        pretrained=str(path),
        features="pooled",
        project=True,
        normalize=True,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            named.featurizer(images).pooled, clip.model.encode_image(images, normalize=True)
        )
    # a checkpoint names its own architecture: a different tower spec in the recipe does not apply
    other = _task(image_tower={**TOWER, "width": 48, "heads": 2}, pretrained=str(path))
    for key, value in clip.model.image_tower.state_dict().items():
        assert torch.equal(other.featurizer.tower.state_dict()[key], value), key


def test_spec_errors_name_the_fix():
    with pytest.raises(ValueError, match="features='tokens'"):
        _task(features="pooled", resampler=RESAMPLER)
    with pytest.raises(ValueError, match="features='pooled'"):
        _task(features="tokens", project=True)
    with pytest.raises(ValueError, match="head"):
        _task(head="rank")
    task = _task()
    no_labels = ImageTextBatch(torch.zeros(2, 3, 32, 32), torch.zeros(2, 1, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError, match="scene_label='count'"):
        task.training_step(no_labels, 0)
    assert task.tokenizer(["a", "b"]).shape == (2, 1) and task.data_config.image_size == (32, 32)


def test_report_writes_metrics_and_checks(tmp_path):
    task = _task(thresholds={"test/accuracy": 0.0})
    report = task.report(_LabelledData(), tmp_path / "report")
    assert (tmp_path / "report" / "metrics.json").is_file() and report["passed"]
    value, target, ok = report["checks"]["test/accuracy"]
    assert value == report["metrics"]["test/accuracy"] and target == 0.0 and ok
    assert report["metrics"]["test/chance_uniform"] == pytest.approx(1 / 3)
