"""Inputs that used to crash (SIGABRT), hang or train on garbage raise errors naming the problem and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmclip.losses import ClipLoss, SigLipLoss
from mmclip.losses.base import EmptyBatchError

# ---- losses: unequal and empty batches --------------------------------------------------------------
EXCHANGING = [
    (ClipLoss, {"exchange": "gather"}),
    (ClipLoss, {"exchange": "gather", "local_loss": True}),
    (SigLipLoss, {"exchange": "ring"}),
    (SigLipLoss, {"exchange": "bidir_ring"}),
    (SigLipLoss, {"exchange": "gather", "chunk_size": 2}),
]
LOCAL = [(ClipLoss, {"exchange": "local"}), (SigLipLoss, {"exchange": "local"})]


def _call(cls, kwargs, n: int):
    x = F.normalize(torch.randn(n, 8), dim=-1).requires_grad_()
    bias = torch.tensor(-3.0) if cls is SigLipLoss else None
    return cls(**kwargs).compute(x, x.flip(0), torch.tensor(5.0), bias)["loss"]


def _unequal_worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for cls, kwargs in EXCHANGING:  # default settings: no SIGABRT from gloo, no error
            loss = _call(cls, kwargs, 3 + rank)  # an epoch's short last batches (exactness: test_distributed)
            loss.backward()
            assert torch.isfinite(loss)
            empty_here = _call(cls, kwargs, 0 if rank == 0 else 2)  # one rank out of samples
            assert torch.isfinite(empty_here)
            with pytest.raises(EmptyBatchError, match="empty batch on every process"):
                _call(cls, kwargs, 0)  # every rank raises together: a task skips the step
        for cls, kwargs in LOCAL:  # no exchange: unequal batches are fine
            assert torch.isfinite(_call(cls, kwargs, 3 + rank))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_unequal_and_empty_rank_batches_work_and_an_empty_step_is_named_on_every_rank(tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_unequal_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


@pytest.mark.parametrize(("cls", "kwargs"), EXCHANGING + LOCAL)
def test_empty_batch_is_named(cls, kwargs) -> None:
    with pytest.raises(ValueError, match=r"empty batch \(0 pairs\).*at least one image-text pair"):
        _call(cls, kwargs, 0)


# ---- models: images, token ids, dimensions -----------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    import mmclip

    return mmclip.create_model("tiny-vit").eval()


def test_channels_last_images_are_told_to_permute(model) -> None:
    images = torch.randn(2, 32, 32, 3)
    for call in (model.encode_image, lambda x: model(x, None), model.image_tower):
        with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\) to \(2, 3, 32, 32\)") as err:
            call(images)
        assert "image_size=" not in str(err.value)


def test_uint8_images_are_told_to_convert_and_normalise(model) -> None:
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"data_config says \(mean=.*torch\.uint8 pixels.*/ 255"):
        model.encode_image(images)


@pytest.mark.parametrize("bad", [49408, 60000, -1])
def test_token_ids_outside_the_vocabulary_name_it(model, bad) -> None:
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=r"vocabulary of 49408 tokens.*tokenizer does not match") as err:
        model.encode_text(ids)
    assert str(bad) in str(err.value)


def test_token_id_check_rides_on_the_trim_sync(model) -> None:
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[:, 2] = model.text_tower.eot_token_id
    assert model.encode_text(ids).shape == (2, model.embed_dim)  # valid ids still pass


@pytest.mark.parametrize("dim", [0, -4])
def test_non_positive_embed_dim_is_rejected(dim) -> None:
    import mmclip

    with pytest.raises(ValueError, match=f"embed_dim must be a positive integer.*got {dim}"):
        mmclip.create_model("tiny-vit", embed_dim=dim)


# ---- recipes: an experiment's callback override without the callbacks it overrides ----------------------
def test_caption_experiment_with_callbacks_none_trains(tmp_path) -> None:
    from mmclip.cli.train import compose, train

    overrides = [
        "experiment=caption_shapes",
        "callbacks=none",  # the experiment still sets callbacks.checkpoint_steps.every_n_train_steps
        f"run_dir={tmp_path}",
        "logger=none",
        "report=false",
        "trainer.max_steps=1",
        "data.batch_size=4",
        "data.n_train=8",
        "data.n_val=4",
        "data.n_test=4",
        "task.tokenizer.num_scenes=20",
        "task.tokenizer.vocab_size=300",
        "task.lm.n_layer=1",
        "task.lm.n_embd=32",
        "task.lm.n_head=2",
    ]
    results = train(compose("caption", overrides))
    assert torch.isfinite(torch.tensor(results["train/loss"]))
