"""Distributed exactness on CPU (gloo, 2 to 5 processes) for every loss x exchange combination.

Convention (what DDP does): each rank back-propagates its own loss; DDP then averages parameter
gradients over the W ranks. So the test compares, against the single-process float64 reference on the
full batch:
- the mean over ranks of the per-rank loss values;
- each rank's feature gradients divided by W (the part DDP's average passes on to the towers);
- the mean over ranks of the logit_scale / logit_bias gradients (replicated parameters).
For the "local" exchange the reference is the mean of the per-shard losses (each rank sees only its own
negatives), which is what that exchange means.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmclip.losses import ClipLoss, SigLipLoss

from .reference import clip_reference, siglip_reference

CASES = [
    ("clip", {"exchange": "gather"}),
    ("clip", {"exchange": "gather", "local_loss": True}),
    ("clip", {"exchange": "gather", "local_loss": True, "label_smoothing": 0.1}),
    ("clip", {"exchange": "local"}),
    ("siglip", {"exchange": "ring"}),
    ("siglip", {"exchange": "bidir_ring"}),
    ("siglip", {"exchange": "gather"}),
    ("siglip", {"exchange": "local"}),
    ("siglip", {"exchange": "ring", "chunk_size": 3}),
    ("siglip", {"exchange": "bidir_ring", "chunk_size": 3}),
    ("siglip", {"exchange": "gather", "chunk_size": 3}),
]
LOCAL_BATCH, DIM, TOL = 5, 8, 1e-6


def _sizes(world: int, uneven: bool) -> list[int]:
    """Rows per rank: equal, or the short batches at the end of an exactly-once epoch (one of them empty)."""
    if not uneven:
        return [LOCAL_BATCH] * world
    return [LOCAL_BATCH + 2, 0, *[LOCAL_BATCH - 2 + r for r in range(world - 2)]][:world]


def _reference(kind: str, kwargs: dict, X, Y, s, b):
    def one(x, y):
        if kind == "clip":
            return clip_reference(x, y, s, label_smoothing=kwargs.get("label_smoothing", 0.0))
        return siglip_reference(x, y, s, b)

    if kwargs["exchange"] != "local":
        return one(X, Y)
    shards = zip(X.split(LOCAL_BATCH), Y.split(LOCAL_BATCH), strict=True)
    return torch.stack([one(x, y) for x, y in shards]).mean()


def _worker(rank: int, world: int, init_file: str, uneven: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sizes = _sizes(world, uneven)
        B = sum(sizes)
        for kind, kwargs in CASES:
            if uneven and kwargs["exchange"] == "local":
                continue  # each rank's own negatives: no full-batch loss to match
            g = torch.Generator().manual_seed(100 + world)
            X = F.normalize(torch.randn(B, DIM, generator=g), dim=-1)
            Y = F.normalize(torch.randn(B, DIM, generator=g), dim=-1)
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            x, y = X[rows].clone().requires_grad_(), Y[rows].clone().requires_grad_()
            scale = torch.tensor(7.0, requires_grad=True)
            bias = torch.tensor(-3.0, requires_grad=True)
            loss_fn = ClipLoss(**kwargs) if kind == "clip" else SigLipLoss(**kwargs)
            loss = loss_fn.compute(x, y, scale, bias if kind == "siglip" else None)["loss"]
            loss.backward()

            reduced = torch.stack(
                [loss.detach(), scale.grad, bias.grad if bias.grad is not None else torch.tensor(0.0)]
            )
            dist.all_reduce(reduced)
            reduced /= world

            X64, Y64 = X.double().requires_grad_(), Y.double().requires_grad_()
            s64, b64 = (
                torch.tensor(7.0, dtype=torch.float64, requires_grad=True),
                torch.tensor(-3.0, dtype=torch.float64, requires_grad=True),
            )
            ref = _reference(kind, kwargs, X64, Y64, s64, b64)
            gX, gY, gs, gb = torch.autograd.grad(ref, [X64, Y64, s64, b64], allow_unused=True)
            where = f"{kind} {kwargs} world={world} rank={rank}"
            assert abs(reduced[0].item() - ref.item()) <= TOL, f"loss {where}"
            torch.testing.assert_close(
                x.grad.double() / world, gX[rows], atol=TOL, rtol=0, msg=f"d/dimage {where}"
            )
            torch.testing.assert_close(
                y.grad.double() / world, gY[rows], atol=TOL, rtol=0, msg=f"d/dtext {where}"
            )
            assert abs(reduced[1].item() - gs.item()) <= TOL, f"d/dlogit_scale {where}"
            if kind == "siglip":
                assert abs(reduced[2].item() - gb.item()) <= TOL, f"d/dlogit_bias {where}"
        dist.barrier()  # every rank done with its sends before any tears down its gloo threads
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_losses_exact_across_processes(world: int, tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), False), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
def test_losses_exact_with_unequal_and_empty_rank_batches(world: int, tmp_path: Path) -> None:
    """An epoch's last batches differ per rank (one may be empty): the loss is still the full-batch loss."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), True), nprocs=world, join=True)
