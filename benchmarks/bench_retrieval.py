"""Retrieval recall@k: time and peak memory of mmclip's chunked RetrievalMetric vs a plain full-matrix torch
implementation, on CPU, fp32, 512-d embeddings, 5 captions per image (COCO's shape).

Every measurement runs in a fresh child process (``python bench_retrieval.py --child ...``). The child
builds the embeddings (memory-lean, in place), notes its RSS, runs the implementation once, and reports
the wall time and its peak RSS (``getrusage``) minus the RSS before the run, i.e. the working memory on
top of the embeddings themselves. Each size runs ``--repeats`` interleaved rounds of every implementation;
the best time is kept (the machine is shared) and every time is in the JSON. Allocations above 1 MiB go through mmap, so RSS follows live tensors.
A plain run whose estimated need exceeds half of the machine's available memory is not started and is
recorded as skipped with the estimate; a child killed by the OS is recorded as OOM.

Both implementations compute the same thing: any-positive R@1/5/10, mean/median rank in both
directions, and the paired 1:1 metrics; the table reports the largest difference between their metric
values (0 unless a negative falls within fp32 rounding of a positive).

    python benchmarks/bench_retrieval.py                      # 5k x 25k and 25k x 125k (a few minutes)
    python benchmarks/bench_retrieval.py --sizes 1000         # quick check

Writes benchmarks/results/bench_retrieval.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIM = 512
CAPTIONS = 5
UPDATE_BATCH = 1024  # images per RetrievalMetric.update (a typical eval batch)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _plain_need_mb(n: int) -> float:
    """Full (N, T) fp32 similarity matrix + one (N, T) bool comparison + the (N, N) paired pair."""
    t = CAPTIONS * n
    return (5 * n * t + 5 * n * n) / 2**20


def _data(n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, DIM, generator=g)  # (N, D)
    images.div_(images.norm(dim=1, keepdim=True))
    t2i = torch.arange(n).repeat_interleave(CAPTIONS)  # (T,)
    texts = torch.randn(CAPTIONS * n, DIM, generator=g).mul_(0.06)  # (T, D) noise
    for start in range(0, texts.shape[0], 65536):
        stop = min(start + 65536, texts.shape[0])
        texts[start:stop] += images[t2i[start:stop]]
    texts.div_(texts.norm(dim=1, keepdim=True))
    return images, texts, t2i


def _plain(images, texts, t2i, ks=(1, 5, 10)) -> dict[str, float]:
    """The straightforward version: one full similarity matrix, the same rank rule."""
    import torch

    from mmclip.metrics.retrieval import RetrievalRanks, summarize_ranks

    def ranks(img, txt, index):
        S = img @ txt.T  # (N, T)
        cols = torch.arange(txt.shape[0])
        pos = S[index, cols]  # (T,)
        t2i_rank = (S > pos[None, :]).sum(0)  # a caption's own image is never above itself
        best = torch.full((img.shape[0],), -math.inf).scatter_reduce(0, index, pos, reduce="amax")
        S[index, cols] = -math.inf
        i2t_rank = (S > best[:, None]).sum(1)
        return RetrievalRanks(i2t_rank, t2i_rank)

    out = summarize_ranks(ranks(images, texts, t2i), ks)
    first = torch.arange(images.shape[0]) * CAPTIONS  # first caption of every image
    return out | summarize_ranks(ranks(images, texts[first], torch.arange(images.shape[0])), ks, "paired_")


def _mmclip(images, texts, t2i, chunk_size: int) -> dict[str, float]:
    import torch

    from mmclip.metrics import RetrievalMetric

    metric = RetrievalMetric(chunk_size=chunk_size)
    ids = torch.arange(images.shape[0])
    for start in range(0, images.shape[0], UPDATE_BATCH):
        rows = slice(start, min(start + UPDATE_BATCH, images.shape[0]))
        caps = slice(rows.start * CAPTIONS, rows.stop * CAPTIONS)
        metric.update(images[rows], ids[rows], texts[caps], t2i[caps])
    return {k: float(v) for k, v in metric.compute().items()}


def child(spec: dict) -> dict:
    import torch

    import mmclip.metrics  # noqa: F401  (imports happen before the baseline: torchmetrics alone is ~300 MB)

    torch.set_num_threads(spec["threads"])
    images, texts, t2i = _data(spec["n"])
    base = _rss_mb()
    start = time.perf_counter()
    if spec["impl"] == "plain":
        metrics = _plain(images, texts, t2i)
    else:
        metrics = _mmclip(images, texts, t2i, spec["chunk_size"])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"seconds": seconds, "peak_mb": peak - base, "data_mb": base, "metrics": metrics}


def _skip_plain(n: int) -> dict | None:
    need, budget = _plain_need_mb(n), 0.5 * _available_mb()
    if need <= budget:
        return None
    why = f"needs ~{need / 1024:.1f} GB (> half of the {2 * budget / 1024:.1f} GB available)"
    print(f"  {'plain':<20} {n:>6} x {CAPTIONS * n:>6}: skipped, {why}", flush=True)
    return {"impl": "plain", "images": n, "captions": CAPTIONS * n, "estimated_mb": need, "skipped": why}


def measure_group(n: int, chunk_sizes: list[int], threads: int, repeats: int) -> list[dict]:
    """Every implementation at one size, ``repeats`` rounds interleaved (round-robin, so a busy spell on
    the shared machine hits all of them); best time and largest peak of each."""
    configs = [("mmclip", c) for c in chunk_sizes]
    skipped = _skip_plain(n)
    if skipped is None:
        configs.append(("plain", 0))
    runs: dict[tuple[str, int], list[dict]] = {cfg: [] for cfg in configs}
    for _ in range(max(1, repeats)):
        for cfg in configs:
            runs[cfg].append(_measure_once(cfg[0], n, cfg[1], threads))
    rows = []
    for rs in runs.values():
        row = rs[0]
        ok = [r for r in rs if "skipped" not in r]
        if ok:
            row = ok[0]
            row["seconds_all"] = [r["seconds"] for r in ok]
            row["seconds"] = min(row["seconds_all"])
            row["peak_mb"] = max(r["peak_mb"] for r in ok)
            print(
                f"  {row['impl']:<20} {n:>6} x {CAPTIONS * n:>6}: {row['seconds']:8.2f} s "
                f"{row['peak_mb']:9.1f} MB",
                flush=True,
            )
        rows.append(row)
    return rows + ([skipped] if skipped else [])


def _measure_once(impl: str, n: int, chunk_size: int, threads: int) -> dict:
    row: dict = {"impl": impl if impl == "plain" else f"mmclip chunk {chunk_size}", "images": n}
    row["captions"] = CAPTIONS * n
    spec = {"impl": impl, "n": n, "chunk_size": chunk_size, "threads": threads}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec), "--child-out", str(out)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out.exists():
            killed = proc.returncode in (-9, 137)
            row["skipped"] = "OOM (killed)" if killed else f"failed: {proc.stderr.strip()[-300:]}"
        else:
            row.update(json.loads(out.read_text()))
    return row


def _table(rows: list[dict]) -> str:
    lines = [
        "| implementation | images x captions | seconds | peak MB (above the embeddings) | max metric diff vs mmclip |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['images']:,} x {r['captions']:,}"
        if "skipped" in r:
            lines.append(f"| {r['impl']} | {size} | skipped: {r['skipped']} | | |")
        else:
            diff = r.get("max_diff")
            lines.append(
                f"| {r['impl']} | {size} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | "
                f"{'' if diff is None else f'{diff:.1e}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[5000, 25000], help="image counts (x5 captions)"
    )
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds per size; best time is kept"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_retrieval.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(json.loads(args.child))))
        return

    import torch

    rows = []
    for n in args.sizes:
        group = measure_group(n, args.chunk_sizes, args.threads, args.repeats)
        reference = next((r["metrics"] for r in group if "metrics" in r), None)
        for r in group:
            if reference is not None and "metrics" in r:
                r["max_diff"] = max(abs(r["metrics"][k] - reference[k]) for k in reference)
        rows += group
    report = _table(rows)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "dim": DIM,
                "captions_per_image": CAPTIONS,
                "threads": args.threads,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
