"""trainer=fsdp's strategy through Lightning, run here on CPU (gloo, one process).

Lightning hands FSDP no device on CPU, and FSDP then refuses to start, so the child process gives it the CPU
device; everything else is the GPU road: ``fsdp_strategy``'s wrap policy, its 0-d parameter lift (FSDP
cannot flatten ``logit_scale`` / ``logit_bias``), the SigLIP loss's own backward, sharded checkpoints,
resuming from one, and the checkpoint directory as a model source. With one rank FSDP does not shard
(NO_SHARD), so the result must equal a plain run's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import mmclip
from mmclip.tasks import ContrastiveTask
from mmclip.tasks.strategies import lift_scalar_parameters
from tests.unit.tasks.fakes import FakeDataModule

ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as pl
    import torch
    import torch.distributed.fsdp as fsdp
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mmclip.tasks import ContrastiveTask
    from mmclip.tasks.strategies import fsdp_strategy
    from tests.unit.tasks.fakes import FakeDataModule

    class CpuFSDP(fsdp.FullyShardedDataParallel):
        def __init__(self, module, *args, device_id=None, **kwargs):
            super().__init__(module, *args, device_id=device_id or torch.device("cpu"), **kwargs)

    fsdp.FullyShardedDataParallel = CpuFSDP


    class Count(pl.Callback):
        batches = 0

        def on_train_batch_end(self, *args):
            self.batches += 1


    def fit(root, steps, resume=None):
        torch.manual_seed(0)
        count = Count()
        task = ContrastiveTask("tiny-vit", loss={"name": "siglip"}, optimizer={"lr": 1e-3}, scheduler={"name": None})
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, strategy=fsdp_strategy(), max_steps=steps, logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
            use_distributed_sampler=False,  # the plain run's batch order (one rank sees every sample anyway)
            callbacks=[ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=2), count],
        )
        # two batches an epoch: the checkpoint at step 2 ends one, so a resume goes on with the next epoch
        trainer.fit(task, datamodule=FakeDataModule(n=16, batch_size=8), ckpt_path=resume, weights_only=True)
        print("LIFTED", tuple(task.model.logit_scale.shape), tuple(task.model.logit_bias.shape))
        print("BATCHES", count.batches)


    first, resumed = sys.argv[1], sys.argv[2]
    fit(first, 2)  # then a new trainer resumes the sharded checkpoint to step 4 (the process group is reused)
    fit(resumed, 4, resume=first + "/last.ckpt")
    """
)


def _fsdp_fits(first: Path, resumed: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561"}
    args = [sys.executable, "-c", _CHILD, str(first), str(resumed)]
    run = subprocess.run(args, cwd=first, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs, benchmarks/gpu_suite.py --only fsdp runs this road")
def test_fsdp_strategy_trains_resumes_and_saves_a_model_source_equal_to_a_plain_run(tmp_path):
    resumed_root = tmp_path / "resumed"
    resumed_root.mkdir()
    out = _fsdp_fits(tmp_path, resumed_root)
    assert out.count("LIFTED (1,) (1,)") == 2
    assert out.count("BATCHES 2") == 2  # the resumed run trained steps 3 and 4 only: it did resume
    sharded = tmp_path / "last.ckpt"
    assert sharded.is_dir() and (sharded / "meta.pt").is_file()  # sharded: a directory of shards
    model = mmclip.create_model(str(resumed_root / "last.ckpt"))  # (1,)-shaped scalars load into () ones
    assert model.logit_scale.shape == () and model.logit_bias.shape == ()

    torch.manual_seed(0)
    task = ContrastiveTask("tiny-vit", loss={"name": "siglip"}, optimizer={"lr": 1e-3}, scheduler={"name": None})
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(task, datamodule=FakeDataModule(n=16, batch_size=8))
    plain = task.model.state_dict()
    assert plain["logit_bias"].item() != -10.0  # the bias trained
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, plain[key], atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def test_lifting_scalar_parameters_keeps_the_model_and_its_gradients():
    from mmclip.losses import SigLipLoss

    torch.manual_seed(0)
    model = mmclip.create_model("tiny-vit", init_logit_bias=-10.0)
    lifted = mmclip.create_model("tiny-vit", init_logit_bias=-10.0)
    lifted.load_state_dict(model.state_dict())
    assert lift_scalar_parameters(lifted) == ["logit_scale", "logit_bias"]
    assert lifted.logit_scale.shape == (1,) and lift_scalar_parameters(lifted) == []
    images, ids = torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 8))
    losses = [SigLipLoss()(m(images, ids))["loss"] for m in (model, lifted)]
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for loss in losses:
        loss.backward()
    assert lifted.logit_bias.grad.shape == (1,)  # the loss's own backward follows the parameter's shape
    torch.testing.assert_close(lifted.logit_scale.grad.reshape(()), model.logit_scale.grad)
    torch.testing.assert_close(lifted.logit_bias.grad.reshape(()), model.logit_bias.grad)


def test_checkpoints_load_across_lifted_and_plain_tasks():
    """A full checkpoint of an FSDP run ((1,) scalars) loads into a plain task, and a plain one into a lifted
    task, through the task's own loading (``load_from_checkpoint`` and resume call ``on_load_checkpoint``)."""
    torch.manual_seed(0)
    plain = ContrastiveTask("tiny-vit", loss={"name": "siglip"})
    lifted = ContrastiveTask("tiny-vit", loss={"name": "siglip"})
    with torch.no_grad():
        lifted.model.logit_bias.fill_(-3.0)
    lift_scalar_parameters(lifted)
    for source, target in ((lifted, plain), (plain, lifted)):
        checkpoint = {"state_dict": {k: v.clone() for k, v in source.state_dict().items()}}
        target.on_load_checkpoint(checkpoint)
        target.load_state_dict(checkpoint["state_dict"])
        assert target.model.logit_bias.reshape(()) == source.model.logit_bias.reshape(())
