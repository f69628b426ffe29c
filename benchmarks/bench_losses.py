"""Contrastive-loss forward+backward time and peak memory per rank: mmclip vs open_clip, same run.

Ranks are simulated by processes on this machine (gloo). Every measurement runs in freshly spawned
processes, so a process's peak RSS (getrusage) minus its RSS just before the loss is that loss's peak
memory on that rank. Features are random, normalised, 512-d, fp32.

    python benchmarks/bench_losses.py                 # all three tables (about 15 minutes on 2 cores)
    python benchmarks/bench_losses.py --quick         # small sizes only

Tables:
1. global batch 1k / 4k / 16k / 32k on 4 ranks, every loss;
2. SigLIP memory per rank as ranks grow at a fixed local batch (ring: flat);
3. SigLIP at global 32k: mmclip ring on 8 ranks vs a dense B x B loss in one process.
Configurations whose estimated memory would not fit this machine are skipped and shown as such.
Writes benchmarks/results/bench_losses.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

DIM = 512
MEMORY_BUDGET_GB = 14.0  # all ranks together; leaves room on a 24 GiB machine


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(impl: str, rank: int, world: int):
    if impl.startswith("mmclip"):
        from mmclip.losses import ClipLoss, SigLipLoss

        return {
            "mmclip clip global": lambda: ClipLoss(),
            "mmclip clip local": lambda: ClipLoss(local_loss=True),
            "mmclip siglip gather": lambda: SigLipLoss(exchange="gather"),
            "mmclip siglip ring": lambda: SigLipLoss(exchange="ring"),
            "mmclip siglip ring chunk1k": lambda: SigLipLoss(exchange="ring", chunk_size=1024),
        }[impl]()
    import open_clip.loss as ocl

    return {
        "open_clip clip global": lambda: ocl.ClipLoss(gather_with_grad=True, rank=rank, world_size=world),
        "open_clip clip local": lambda: ocl.ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world
        ),
        "open_clip siglip": lambda: ocl.SigLipLoss(rank=rank, world_size=world),
    }[impl]()


def _worker(rank: int, world: int, init: str, impl: str, local: int, iters: int, out: str) -> None:
    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    loss_fn = _build(impl, rank, world)
    g = torch.Generator().manual_seed(rank)
    x = F.normalize(torch.randn(local, DIM, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(local, DIM, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    siglip = "siglip" in impl

    def step() -> None:
        if impl.startswith("mmclip"):
            loss = loss_fn.compute(x, y, scale, bias if siglip else None)["loss"]
        else:
            loss = loss_fn(x, y, scale, bias) if siglip else loss_fn(x, y, scale)
        loss.backward()
        x.grad = y.grad = scale.grad = bias.grad = None

    base = _rss_mb()
    times = []
    for _ in range(iters):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        step()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    result = torch.tensor([statistics.median(times), peak - base])
    if world > 1:
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": result[0].item(), "peak_mb_per_rank": result[1].item()}))


def estimate_gb(impl: str, global_batch: int, world: int) -> float:
    """Rough memory for all ranks together (fp32), to skip what cannot fit."""
    b, B = global_batch // world, global_batch
    if impl.endswith("clip global"):
        per_rank = 4 * B * B  # logits, softmax and their grads
    elif impl.endswith("clip local"):
        per_rank = 6 * b * B
    elif impl == "open_clip siglip":
        per_rank = 4 * b * b * world  # autograd keeps every ring step's b x b block
    elif impl == "mmclip siglip gather":
        per_rank = 4 * b * B
    else:  # mmclip ring: one block's temporaries at a time
        per_rank = 3 * b * min(b, 1024 if "chunk" in impl else b)
    return world * (per_rank * 4 + 8 * B * DIM * 4) / 2**30


def measure(impl: str, global_batch: int, world: int, iters: int) -> dict:
    row = {"impl": impl, "global_batch": global_batch, "ranks": world, "local_batch": global_batch // world}
    est = estimate_gb(impl, global_batch, world)
    if est > MEMORY_BUDGET_GB:
        row.update(skipped=f"needs ~{est:.0f} GB for {world} ranks")
        return row
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        for attempt in range(2):  # gloo occasionally aborts in teardown on an oversubscribed CPU
            try:
                mp.spawn(
                    _worker,
                    args=(
                        world,
                        os.path.join(tmp, f"rdzv{attempt}"),
                        impl,
                        global_batch // world,
                        iters,
                        out,
                    ),
                    nprocs=world,
                    join=True,
                )
                break
            except Exception as err:  # noqa: BLE001 - e.g. a rank killed for memory: reported, not fatal
                if attempt == 1 or Path(out).exists():
                    if not Path(out).exists():
                        row.update(skipped=f"failed ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
                        return row
                    break
        row.update(json.loads(Path(out).read_text()))
    print(
        f"  {impl:<28} B={global_batch:>6} W={world} {row.get('seconds', 0):8.3f}s "
        f"{row.get('peak_mb_per_rank', 0):9.1f} MB/rank",
        flush=True,
    )
    return row


def _table(title: str, rows: list[dict]) -> str:
    lines = [
        f"### {title}",
        "",
        "| loss | global batch | ranks | local batch | fwd+bwd s | peak MB per rank |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['impl']} | {r['global_batch']} | {r['ranks']} | {r['local_batch']} | "
                f"skipped: {r['skipped']} | |"
            )
        else:
            lines.append(
                f"| {r['impl']} | {r['global_batch']} | {r['ranks']} | {r['local_batch']} | "
                f"{r['seconds']:.3f} | {r['peak_mb_per_rank']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="global batches 1k and 4k only")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_losses.json"))
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Allocations above 1 MiB get their own mapping and go back to the OS when freed, so a process's
    # peak RSS measures the peak of live tensors rather than the allocator's fragmentation.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    impls = [
        "mmclip clip global",
        "mmclip clip local",
        "open_clip clip global",
        "open_clip clip local",
        "mmclip siglip gather",
        "mmclip siglip ring",
        "open_clip siglip",
    ]
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384, 32768]

    print("table 1: every loss on 4 ranks")
    t1 = [measure(impl, B, 4, args.iters if B <= 4096 else 1) for B in sizes for impl in impls]
    print("table 2: SigLIP per-rank memory as ranks grow, local batch 2048")
    t2 = [
        measure(impl, 2048 * w, w, args.iters)
        for w in (1, 2, 4, 8)
        for impl in ("mmclip siglip ring", "mmclip siglip gather", "open_clip siglip")
    ]
    t3 = []
    if not args.quick:
        print("table 3: SigLIP at global batch 32k")
        t3 = [measure("mmclip siglip ring chunk1k", 32768, 8, 1), measure("mmclip siglip ring", 32768, 8, 1)]
        t3 += [measure("open_clip siglip", B, 1, 1) for B in (8192, 16384, 32768)]  # dense B x B, one process
    report = "\n\n".join(
        [_table("Every loss, 4 ranks", t1), _table("SigLIP memory per rank vs ranks (local batch 2048)", t2)]
        + (
            [_table("SigLIP at global batch 32k: ring on 8 ranks vs dense B x B in one process", t3)]
            if t3
            else []
        )
    )
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "dim": DIM, "tables": [t1, t2, t3]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
