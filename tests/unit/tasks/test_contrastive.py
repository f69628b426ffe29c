import math
import os

import lightning.pytorch as pl
import pytest
import torch

from mmclip.losses import ClipLoss
from mmclip.models.factory import get_model_config, merge_config, resolve_model
from mmclip.tasks import ContrastiveTask
from tests.unit.tasks.fakes import FakeDataModule


def _fit(task, steps=2, batch_size=8, **trainer_kwargs):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(task, datamodule=FakeDataModule(batch_size=batch_size))
    return trainer


def _weights(task):
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}


def test_model_config_merges_or_replaces_towers():
    cfg = resolve_model("tiny-vit", image_tower={"patch_dropout": 0.5}).config
    base = get_model_config("tiny-vit")
    assert cfg["image_tower"] == {**base["image_tower"], "patch_dropout": 0.5}
    cfg = merge_config(base, {"image_tower": {"name": "timm", "model_name": "resnet18"}})
    assert cfg["image_tower"] == {"name": "timm", "model_name": "resnet18"}
    assert cfg["text_tower"] == base["text_tower"]
    with pytest.raises(ValueError, match="model source"):
        ContrastiveTask(model=None, image_tower={"name": "clip_vit"})


def test_training_step_loss_is_the_clip_loss_of_the_model_output():
    task = ContrastiveTask("tiny-vit", optimizer={"lr": 1e-3}, scheduler={"name": None})
    task.log = lambda *args, **kwargs: None  # no trainer attached
    batch = next(iter(FakeDataModule().train_dataloader()))
    loss = task.training_step(batch, 0)
    out = task.model(batch.images, batch.input_ids)
    x, y, s = out.image_embeds, out.text_embeds, out.logit_scale
    logits = s * x @ y.T
    labels = torch.arange(len(x))
    expected = (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    torch.testing.assert_close(loss, expected)
    assert isinstance(task.loss, ClipLoss)


def test_temperature_is_clamped_after_every_step():
    task = ContrastiveTask("tiny-vit", optimizer={"lr": 1e-3}, scheduler={"name": None})
    with torch.no_grad():
        task.model.logit_scale.fill_(math.log(1000.0))
    _fit(task, steps=1)
    assert task.model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_micro_batches_give_the_full_batch_step():
    torch.manual_seed(0)
    # plain SGD: the step is the gradient itself (Adam's first step would amplify rounding in tiny gradients)
    sgd = {"name": "sgd", "lr": 1.0, "weight_decay": 0.0}
    plain = ContrastiveTask("tiny-vit", optimizer=sgd, scheduler={"name": None})
    cached = ContrastiveTask("tiny-vit", optimizer=sgd, scheduler={"name": None}, micro_batch_size=3)
    cached.model.load_state_dict(plain.model.state_dict())
    start = _weights(plain)
    _fit(plain, steps=1)
    _fit(cached, steps=1)
    a, b = _weights(plain), _weights(cached)
    for k in a:
        # equal up to float32 accumulation order: a tolerance relative to the size of this tensor's step
        scale = (a[k] - start[k]).abs().max().item()
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5 * scale + 1e-6, msg=k)
    moved = [k for k in a if not torch.equal(a[k], start[k])]
    assert len(moved) > len(a) // 2  # the step did update (nearly) every tensor


def test_locked_image_tower_does_not_move():
    task = ContrastiveTask(
        "tiny-vit", lock_image={"unlocked_groups": 0}, optimizer={"lr": 1e-2}, scheduler={"name": None}
    )
    before = _weights(task)
    _fit(task, steps=2)
    after = _weights(task)
    assert all(
        torch.equal(before[k], after[k]) for k in before if k.startswith(("image_tower.", "image_proj."))
    )
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text_tower."))


def test_checkpoint_loads_weights_only_and_rebuilds(tmp_path):
    task = ContrastiveTask(
        "tiny-vit",
        loss={"name": "siglip", "exchange": "gather"},
        model_kwargs={"init_logit_bias": -10.0},
        optimizer={"lr": 1e-3},
        scheduler={"name": "cosine", "warmup_steps": 1},
    )
    trainer = _fit(task, steps=2)
    path = tmp_path / "t.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # no pickled objects in the file
    again = ContrastiveTask.load_from_checkpoint(path, weights_only=True)
    for k, v in _weights(task).items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert again.hparams.loss == {"name": "siglip", "exchange": "gather"}


def test_patch_dropout_needs_a_vit():
    with pytest.raises(ValueError, match="patch_dropout"):
        ContrastiveTask("tiny-resnet", patch_dropout=0.5)
    assert ContrastiveTask("tiny-vit", patch_dropout=0.5).model.image_tower.patch_dropout == 0.5


# ---- the short and empty batches at the end of an exactly-once epoch ---------------------------------
def _batches(sizes: list[int], seed: int) -> list:
    from mmclip.data.batch import ImageTextBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        ids = torch.randint(1, 49406, (n, 6), generator=g)
        ids[:, -1] = 49407
        out.append(ImageTextBatch(torch.randn(n, 3, 32, 32, generator=g), ids, [f"k{seed}-{i}" for i in range(n)]))
    return out


def _as_is(batch):
    return batch


class _RankBatches(pl.LightningDataModule):
    """Each rank's batches: equal, then unequal, then one rank empty, then every rank empty."""

    SIZES = {0: [4, 4, 3, 0], 1: [4, 2, 0, 0]}

    def __init__(self) -> None:
        super().__init__()
        self.skip_stats = None

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        rank = self.trainer.global_rank
        batches = _batches(self.SIZES[rank] if self.trainer.world_size > 1 else [4, 0, 3], seed=rank)
        return DataLoader(batches, batch_size=None, collate_fn=_as_is)


class _RecordSteps(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(batch) == 0:  # an empty batch leaves the weights as they were (one process, or all ranks empty)
            changed = any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters(), strict=True))
            self.empty_changed = changed  # the last empty batch's step

    def on_train_end(self, trainer, pl_module) -> None:
        finite = all(torch.isfinite(p).all() for p in pl_module.parameters())
        total = sum(float(p.double().sum()) for p in pl_module.parameters())
        with open(f"{self.out}.{trainer.global_rank}", "w") as f:
            f.write(f"{trainer.global_step} {finite} {total!r} {getattr(self, 'empty_changed', None)}")


def test_an_empty_batch_is_a_skipped_step_in_one_process(tmp_path):
    task = ContrastiveTask("tiny-vit", optimizer={"lr": 1e-3}, scheduler={"name": None})
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_RecordSteps(str(tmp_path / "steps"))])
    trainer.fit(task, datamodule=_RankBatches())
    steps, finite, _, empty_changed = (tmp_path / "steps.0").read_text().split()
    assert (steps, finite, empty_changed) == ("3", "True", "False")  # the empty batch's step updates nothing


def test_unequal_and_empty_rank_batches_train_under_ddp(tmp_path):
    """Two processes whose batches differ and run out at different steps: no hang, no error, and a step
    with no pair anywhere is skipped on both ranks together."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    task = ContrastiveTask("tiny-vit", optimizer={"lr": 1e-3}, scheduler={"name": None})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=[_RecordSteps(str(tmp_path / "steps"))])
    trainer.fit(task, datamodule=_RankBatches())
    rank0 = (tmp_path / "steps.0").read_text().split()
    rank1 = (tmp_path / "steps.1").read_text().split()
    assert rank0[:2] == rank1[:2] == ["4", "True"]
    assert rank0[2] == rank1[2]  # the ranks' weights stay identical (no rank updated alone)
    assert rank1[3] == "False"  # the last step, empty on every rank, updated nothing
