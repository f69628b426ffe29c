"""Eval callbacks under a real Trainer: schedule, logging, train-mode restore, and 2-process DDP results
equal to the single-process ``evaluate``."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from mmclip.evaluation import LinearProbeEval, RetrievalEval, ZeroShotEval, evaluate

from ..metrics.fakes import FakeDataModule, fake_model
from ..metrics.fakes import standard_datamodule as _plain_datamodule


class LitFakeDataModule(FakeDataModule, pl.LightningDataModule):
    pass


def standard_datamodule(**kwargs) -> LitFakeDataModule:
    return _plain_datamodule(cls=LitFakeDataModule, **kwargs)


class FakeTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = fake_model(8)
        self.train_flags: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.train_flags.append(self.model.training and self.model.image_tower.training)
        return (self.model.logit_scale - 1.0) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def steps_with(self, key: str) -> list[int]:
        return [s for s, m in self.records if key in m]


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **kwargs,
    )


def _expected(prefix: str = "val") -> dict[str, float]:
    res = evaluate(fake_model(8), datamodule=standard_datamodule())
    return {f"{prefix}/{k}": v for k, v in res.items()}


def test_schedule_logging_and_train_mode() -> None:
    retrieval = RetrievalEval(every_n_steps=3, every_n_epochs=None)
    zeroshot = ZeroShotEval(every_n_epochs=1)
    probe = LinearProbeEval()  # only at fit end
    logger = MemoryLogger()
    task = FakeTask()
    trainer = _trainer(devices=1, max_epochs=2, logger=logger, callbacks=[retrieval, zeroshot, probe])
    trainer.fit(task, datamodule=standard_datamodule())  # 4 steps per epoch

    assert logger.steps_with("val/retrieval/t2i_R@1") == [3, 6, 8]  # every 3 steps, then fit end
    assert len(logger.steps_with("val/zeroshot/top1")) == 2  # each epoch end; fit end is the same step
    assert len(logger.steps_with("val/linear_probe/accuracy")) == 1
    want = _expected()
    for cb in (retrieval, zeroshot, probe):
        assert cb.last_results and all(cb.last_results[k] == want[k] for k in cb.last_results)
    assert set(retrieval.last_results) | set(zeroshot.last_results) | set(probe.last_results) == set(want)
    assert trainer.callback_metrics["val/zeroshot/top1"].item() == pytest.approx(want["val/zeroshot/top1"])
    assert len(task.train_flags) == 8 and all(task.train_flags)  # train mode restored after each eval


def test_callbacks_skip_unlabelled_data_and_validate_args() -> None:
    dm = standard_datamodule()
    dm.classnames = None
    zeroshot = ZeroShotEval(every_n_epochs=1, prefix="eval/zs")
    _trainer(devices=1, max_epochs=1, logger=False, callbacks=[zeroshot]).fit(FakeTask(), datamodule=dm)
    assert zeroshot.last_results == {}
    with pytest.raises(ValueError, match="every_n_steps"):
        RetrievalEval(every_n_steps=0)


@pytest.mark.filterwarnings("ignore")
def test_ddp_two_processes_equal_single_process() -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    callbacks = [
        RetrievalEval(every_n_epochs=1, chunk_size=5),
        ZeroShotEval(every_n_epochs=1),
        LinearProbeEval(every_n_epochs=1),
    ]
    trainer = _trainer(devices=2, strategy="ddp_spawn", max_epochs=1, logger=False, callbacks=callbacks)
    trainer.fit(FakeTask(), datamodule=standard_datamodule(pad=True, batch_size=3))
    want = _expected()
    got = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
