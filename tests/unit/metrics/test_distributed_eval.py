"""Two gloo processes give the same evaluation results as one process.

- ``RetrievalMetric`` / ``ZeroShotAccuracy`` with uneven shards, duplicated samples (sampler padding)
  and a process that saw no data at all.
- ``evaluate`` (the ``run_*`` functions the eval callbacks call with each rank's shard) on a fake data
  module sharded like ``DistributedSampler`` (padding duplicates) and in uneven blocks, against the
  single-process result computed in the same worker before the process group exists; and
  ``evaluate(distributed=False)`` on one rank alone inside the group.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmclip.evaluation import evaluate
from mmclip.metrics import RetrievalMetric, ZeroShotAccuracy, retrieval_metrics

from .fakes import fake_model, standard_datamodule
from .test_retrieval import random_problem

WORLD = 2


def _check_metrics(rank: int) -> None:
    images, texts, t2i = random_problem(31, (1, 5), 4, seed=21)
    want = retrieval_metrics(images, texts, t2i, chunk_size=5)
    # rank 0: first 9 images, rank 1: the other 22 plus 4 duplicates of rank 0's
    shares = {0: list(range(9)), 1: list(range(9, 31)) + [0, 3, 4, 8]}
    mine = shares[rank]
    metric = RetrievalMetric(chunk_size=5)
    for start in range(0, len(mine), 6):
        rows = mine[start : start + 6]
        caps = [j for r in rows for j in range(t2i.numel()) if t2i[j] == r]
        metric.update(images[rows], torch.tensor(rows), texts[caps], t2i[caps])
    got = {k: float(v) for k, v in metric.compute().items()}
    assert got == want, (rank, got, want)

    # a process that saw nothing
    metric = RetrievalMetric(chunk_size=4)
    if rank == 1:
        metric.update(images, torch.arange(31), texts, t2i)
    got = {k: float(v) for k, v in metric.compute().items()}
    assert got == retrieval_metrics(images, texts, t2i, chunk_size=4)

    g = torch.Generator().manual_seed(4)
    logits = torch.randint(0, 4, (40, 6), generator=g).float()  # many ties
    labels = torch.randint(0, 6, (40,), generator=g)
    ref = ZeroShotAccuracy(num_classes=6)
    ref._to_sync = False
    ref.update(logits, labels, torch.arange(40))
    want_zs = ref.compute()
    zs = ZeroShotAccuracy(num_classes=6)
    rows = list(range(0, 13)) if rank == 0 else list(range(13, 40)) + [1, 2]
    zs.update(logits[rows], labels[rows], torch.tensor(rows))
    got_zs = zs.compute()
    for k, v in want_zs.items():
        torch.testing.assert_close(got_zs[k], v, equal_nan=True, rtol=0, atol=0)


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    model = fake_model(8)
    single = {pad: evaluate(model, datamodule=standard_datamodule(pad=pad)) for pad in (True, False)}
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        _check_metrics(rank)
        for pad in (True, False):
            dm = standard_datamodule(pad=pad, batch_size=3)
            sharded = evaluate(model, datamodule=dm)
            assert set(sharded) == set(single[pad])
            for k, v in single[pad].items():
                assert sharded[k] == v, (rank, pad, k, sharded[k], v)
        if rank == 0:  # one process alone inside the group: no collective may be issued
            assert evaluate(model, datamodule=standard_datamodule(), distributed=False) == single[True]
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def test_fake_shards_are_what_the_test_claims() -> None:
    from .fakes import shard_indices

    padded = [shard_indices(23, r, 2, pad=True) for r in range(2)]
    assert sorted(padded[0] + padded[1]) == sorted([*range(23), 0])  # one duplicate
    blocks = [shard_indices(23, r, 2, pad=False) for r in range(2)]
    assert blocks[0] + blocks[1] == list(range(23)) and len(blocks[0]) != len(blocks[1])
