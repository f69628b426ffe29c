"""Feature-cache accumulation gives the gradients of one full-batch step."""

from __future__ import annotations

import pytest
import torch

import mmclip
from mmclip.losses import ClipLoss, SigLipLoss, cached_feature_step


def _full_batch_grads(model, loss_fn, images, texts) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_fn(model(images, texts))["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "name,loss_fn", [("tiny-vit", ClipLoss()), ("tiny-resnet", ClipLoss()), ("tiny-siglip", SigLipLoss())]
)
@pytest.mark.parametrize("micro", [3, 8])
def test_same_gradients_as_full_batch(name: str, loss_fn, micro: int) -> None:
    torch.manual_seed(0)
    model = mmclip.create_model(name).double().train()  # float64: equality up to rounding, tightly
    if name == "tiny-resnet":
        model.image_tower.lock(freeze_norm=True)  # BatchNorm in train mode depends on the batch split
        model.image_tower.requires_grad_(True)
    size = model.data_config.image_size
    images = torch.randn(8, 3, *size, dtype=torch.float64)
    texts = torch.randint(1, 1000, (8, 12))
    texts[:, 11] = 999 if name != "tiny-siglip" else texts[:, 11]
    ref = _full_batch_grads(model, loss_fn, images, texts)
    model.zero_grad()
    out = cached_feature_step(model, loss_fn, images, texts, micro_batch_size=micro)
    assert torch.isfinite(out["loss"])
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-10, rtol=1e-8, msg=key)


def test_random_state_replayed_for_patch_dropout() -> None:
    """With patch dropout the re-forward must see the masks of the cached pass (else gradients are wrong)."""
    torch.manual_seed(0)
    model = mmclip.create_model("tiny-vit", image_tower={"patch_dropout": 0.5}).train()
    images, texts = torch.randn(6, 3, 32, 32), torch.randint(1, 49406, (6, 10))
    seen = []
    original = model.image_tower.forward

    def spy(x):
        out = original(x)
        seen.append(out.pooled.detach().clone())
        return out

    model.image_tower.forward = spy
    cached_feature_step(model, ClipLoss(), images, texts, micro_batch_size=2)
    cached, replayed = seen[:3], seen[3:]
    for a, b in zip(cached, replayed, strict=True):
        torch.testing.assert_close(a, b)


def test_rejects_bad_arguments() -> None:
    model = mmclip.create_model("tiny-vit")
    with pytest.raises(ValueError, match="micro_batch_size"):
        cached_feature_step(
            model, ClipLoss(), torch.randn(2, 3, 32, 32), torch.zeros(2, 5, dtype=torch.long), 0
        )
    with pytest.raises(ValueError, match="pair them one to one"):
        cached_feature_step(
            model, ClipLoss(), torch.randn(2, 3, 32, 32), torch.zeros(3, 5, dtype=torch.long), 1
        )


def _ddp_worker(rank: int, world: int, init_file: str, wrap: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights and the same full batch on every rank
        model = mmclip.create_model("tiny-vit").double().train()
        images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
        texts = torch.randint(1, 49406, (8, 10))
        # single-process reference: the whole batch, one step, no exchange
        ref = _full_batch_grads(model, ClipLoss(), images, texts)
        model.zero_grad()
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        target = DistributedDataParallel(model) if wrap else model
        cached_feature_step(
            target, ClipLoss(exchange="gather"), images[rows], texts[rows], micro_batch_size=3
        )
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[name], atol=1e-10, rtol=1e-8, msg=f"{name} rank {rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", [False, True])
def test_across_processes_equals_full_batch(tmp_path, wrap: bool) -> None:
    """2 processes x 4 samples, micro-batches of 3, gathered negatives == one 8-sample step in one process."""
    import os

    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rdzv"), wrap), nprocs=2, join=True)
