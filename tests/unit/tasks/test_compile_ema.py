"""The GPU road's parts on CPU: a compiled training step equals the eager one with bounded recompiles, EMA
weights follow torch's own EMA rule and resume bit for bit, and the fast defaults are what they claim."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mmclip.data.batch import ImageTextBatch
from mmclip.tasks import ContrastiveTask
from mmclip.tasks.accelerate import compile_options, pad_text_for_compile
from mmclip.tasks.optim import build_optimizer
from tests.unit.tasks.fakes import FakeDataModule

EOT = 49407


def _batch(length: int, seed: int, n: int = 6, context: int = 77) -> ImageTextBatch:
    """Captions of ``length`` tokens (end-of-text included), padded with zeros to ``context``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, context, dtype=torch.long)
    ids[:, : length - 1] = torch.randint(1, EOT - 1, (n, length - 1), generator=g)
    ids[:, length - 1] = EOT
    return ImageTextBatch(torch.randn(n, 3, 32, 32, generator=g), ids, [f"k{i}" for i in range(n)])


def _task(**kwargs) -> ContrastiveTask:
    torch.manual_seed(0)
    task = ContrastiveTask("tiny-vit", optimizer={"lr": 1e-2}, scheduler={"name": None}, **kwargs)
    task.log = lambda *args, **kw: None  # no trainer attached
    return task


def _steps(task: ContrastiveTask, batches: list[ImageTextBatch]) -> list[float]:
    # SGD: Adam's first steps turn rounding-level gradients into lr-sized moves of either sign
    opt = build_optimizer(task.model, name="sgd", lr=0.5, weight_decay=0.0)
    losses = []
    for i, batch in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = task.training_step(batch, i)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("multiple", [None, 8])
def test_compiled_step_equals_eager_with_at_most_one_recompile(multiple):
    batches = [_batch(length, seed) for seed, length in enumerate([5, 12, 20, 33, 61])]
    eager = _task()
    counter = CompileCounterWithBackend("inductor")
    compiled = _task(compile={"backend": counter}, text_pad_multiple=multiple)
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), compiled.state_dict().values(), strict=True))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiling keeps the checkpoint's keys
    torch._dynamo.reset()
    reference = _steps(eager, batches)
    first = _steps(compiled, batches[:1])
    graphs = counter.frame_count  # every graph of the first batch (image and text towers)
    assert graphs >= 2
    rest = _steps(compiled, batches[1:])
    assert counter.frame_count - graphs <= 1, f"{counter.frame_count - graphs} recompiles over 4 caption lengths"
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(reference), atol=1e-4, rtol=0)
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=name)


def test_text_padding_under_compile_rounds_the_longest_caption_up():
    task = _task()
    ids = _batch(13, 0).input_ids
    assert pad_text_for_compile(ids, task.model.text_tower, None) is ids  # full length: one shape
    assert pad_text_for_compile(ids, task.model.text_tower, 8).shape == (6, 16)
    assert pad_text_for_compile(_batch(77, 0).input_ids, task.model.text_tower, 8).shape == (6, 77)
    # the padded captions embed exactly as the untrimmed ones (the tower is causal, pooled at end-of-text)
    with torch.no_grad():
        torch.testing.assert_close(
            task.model.encode_text(pad_text_for_compile(ids, task.model.text_tower, 8)),
            task.model.encode_text(ids),
        )
    with pytest.raises(ValueError, match="compile mode"):
        compile_options("fastest")


# ---- EMA ---------------------------------------------------------------------------------------------
def _fit(task, steps, ckpt_path=None, callbacks=(), root=None):
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
        default_root_dir=root,
    )
    trainer.fit(task, datamodule=FakeDataModule(batch_size=8), ckpt_path=ckpt_path, weights_only=True)
    return trainer


def test_ema_follows_the_ema_rule_over_the_trained_weights():
    task = _task(ema={"decay": 0.5})
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(copy.deepcopy(pl_module.model.state_dict()))

    _fit(task, 3, callbacks=[Record()])
    expected = {k: v.clone() for k, v in seen[0].items()}  # the first update copies the weights
    for state in seen[1:]:
        expected = {k: 0.5 * e + 0.5 * state[k] if e.is_floating_point() else state[k] for k, e in expected.items()}
    for key, value in task.ema.module.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert task.eval_model is task.ema.module
    assert not any(p.requires_grad for p in task.ema.parameters())
    optimized = {id(p) for group in task.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in task.ema.parameters()}  # the optimizer never holds the average


def test_ema_resumes_bit_identical_and_is_the_checkpoints_model(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    import mmclip

    straight = _task(ema={"decay": 0.9})
    _fit(straight, 8)  # two epochs of 4 batches
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    _fit(_task(ema={"decay": 0.9}), 4, callbacks=[ckpt], root=tmp_path)
    (path,) = tmp_path.glob("*.ckpt")
    resumed = _task(ema={"decay": 0.9})
    _fit(resumed, 8, ckpt_path=str(path))
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key  # model, EMA weights and the EMA's update count
    assert int(resumed.ema.n_averaged) == 8
    # a checkpoint with EMA weights is a model source whose weights are the average
    loaded = mmclip.create_model(str(path))
    half = torch.load(path, weights_only=True)["state_dict"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, half[f"ema.module.{key}"]), key


def test_ema_settings_are_checked():
    with pytest.raises(ValueError, match="decay"):
        _task(ema={"decay": 1.5})
    with pytest.raises(ValueError, match="unknown ema settings"):
        _task(ema={"decay": 0.9, "every": 2})


# ---- the fast defaults -------------------------------------------------------------------------------------
def test_fused_adamw_is_chosen_for_cuda_parameters_only():
    model = torch.nn.Linear(4, 4)
    assert not build_optimizer(model).defaults["fused"]  # CPU parameters: the foreach kernel
    assert build_optimizer(model, fused=True).defaults["fused"] is True  # asked for explicitly
    if torch.cuda.is_available():
        assert build_optimizer(model.cuda()).defaults["fused"] is True


def test_cuda_defaults_turn_convolutional_towers_channels_last_and_leave_vits(monkeypatch):
    from mmclip.models.factory import create_model
    from mmclip.tasks.accelerate import cuda_defaults

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        convnet = create_model("tiny-convnext")
        vit = create_model("tiny-vit")
        images = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            before = convnet.encode_image(images)
        done = cuda_defaults(convnet)
        assert "TF32 matmuls" in done and torch.get_float32_matmul_precision() == "high"
        assert convnet.image_tower.channels_last
        assert all(p.is_contiguous(memory_format=torch.channels_last)
                   for p in convnet.image_tower.parameters() if p.ndim == 4)
        with torch.no_grad():  # the same embeddings in the other layout
            torch.testing.assert_close(convnet.encode_image(images), before, atol=1e-5, rtol=1e-4)
        assert not any(name.startswith("channels-last") for name in cuda_defaults(vit))
    finally:
        torch.set_float32_matmul_precision(precision)


# ---- sharded checkpoints as model sources ------------------------------------------------------------------
def test_a_sharded_checkpoint_directory_is_a_model_source(tmp_path):
    """The layout ``trainer=fsdp`` writes (``torch.distributed.checkpoint`` shards of ``{"model": state_dict,
    "optimizer_0": ...}`` and the rest in ``meta.pt``) loads as a model in one process, EMA weights included."""
    import torch.distributed.checkpoint as dcp

    import mmclip

    task = _task(ema={"decay": 0.5})
    trainer = _fit(task, 2)
    path = tmp_path / "full.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    sharded = tmp_path / "last.ckpt"  # a directory, as FSDP writes it
    dcp.save({"model": checkpoint.pop("state_dict"), "optimizer_0": checkpoint.pop("optimizer_states")[0]},
             checkpoint_id=sharded, no_dist=True)
    torch.save(checkpoint, sharded / "meta.pt")
    model = mmclip.create_model(str(sharded))
    for key, value in model.state_dict().items():
        assert torch.equal(value, task.ema.module.state_dict()[key]), key
