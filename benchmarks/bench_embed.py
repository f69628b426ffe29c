"""Embedding a folder of JPEGs: ``mmclip.embedding.writer`` vs a plain open_clip loop, same weights, same run.

A folder of JPEG scenes (the synthetic shapes data set rendered at 256-384 px per side, non-square,
quality 90) is written to a temporary directory. Both sides embed every image in it, in the same order,
with the same architecture and weights (open_clip's model converted into mmclip with
``convert_openclip_state_dict``) and the same batch size:

* mmclip: :func:`mmclip.embedding.writer.embed_corpus` over ``ImageFolderSource`` (DataLoader workers decode and
  transform, ``torch.inference_mode``, float16 store with ids parquet files written to a temporary folder);
* open_clip: ``open_clip.create_model_and_transforms(arch, pretrained=None)`` and its ``preprocess``, then
  the loop every open_clip user writes: ``PIL.Image.open`` per file, ``preprocess``, ``torch.stack``,
  ``encode_image(normalize=True)`` under ``torch.inference_mode`` in the main process.

A second open_clip row runs ``preprocess`` on one torch thread (the model on all of them): the per-sample
torch ops of ToTensor + Normalize stall when torch's intra-op threads compete with other processes, and
a careful user would avoid that; "ratio vs best open_clip" compares with the faster of the two rows.
mmclip's transform has no per-sample torch ops (a lookup table gives the same bits), so it needs no such
care. Rounds alternate between all rows; the median round is reported as images per second. The script also
checks that the two sides' embeddings agree (max abs difference, float16 storage included).

    python benchmarks/bench_embed.py                            # ViT-B-32 at 4 layers, 512 images
    python benchmarks/bench_embed.py --n 256 --rounds 1         # quick look
    python benchmarks/bench_embed.py --arch RN50 --layers 0     # the full RN50 (0 = the architecture's own depth)

Writes benchmarks/results/bench_embed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mmclip
from mmclip.data.synthetic import SyntheticShapes, render
from mmclip.embedding.sources import ImageFolderSource
from mmclip.embedding.writer import EmbeddingStore, embed_corpus
from mmclip.models.convert import convert_openclip_state_dict, load_checkpoint


def write_jpegs(
    directory: Path, n: int, min_side: int, max_side: int, seed: int = 0
) -> list[tuple[int, int]]:
    """``n`` JPEG scenes of ``min_side``-``max_side`` px per side (non-square), quality 90."""
    rng = random.Random(seed)
    shapes = SyntheticShapes("val", n, image_size=64)
    sizes = []
    for i in range(n):
        w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        img = render(shapes.scene(i), max(w, h)).crop((0, 0, w, h))
        sub = directory / f"{i % 8:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"scene{i:06d}.jpg", format="JPEG", quality=90)
        sizes.append((w, h))
    return sizes


def build(arch: str, layers: int):
    import open_clip

    cfg = open_clip.get_model_config(arch)
    overrides = {}
    if layers:
        overrides = {
            "vision_cfg": dict(cfg["vision_cfg"], layers=layers),
            "text_cfg": dict(cfg["text_cfg"], layers=layers),
        }
    oc, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, **overrides)
    oc.eval()
    tower = {"layers": layers} if layers else {}
    mm = mmclip.create_model(arch, image_tower=tower, text_tower=tower)
    load_checkpoint(mm, convert_openclip_state_dict(oc.state_dict()))
    return mm.eval(), oc, preprocess


def run_mmclip(model, folder: Path, batch: int, workers: int) -> tuple[int, float, Path]:
    out = Path(tempfile.mkdtemp(prefix="bench_embed_store_"))
    start = time.perf_counter()
    result = embed_corpus(
        model,
        None,
        ImageFolderSource(folder),
        out,
        batch_size=batch,
        num_workers=workers,
        shard_size=4096,
        progress=False,
    )
    return result.embedded, time.perf_counter() - start, out


def run_open_clip(
    model, preprocess, folder: Path, batch: int, preprocess_threads: int | None = None
) -> tuple[int, float, np.ndarray]:
    """The plain loop; ``preprocess_threads=1`` runs ``preprocess`` on one torch thread (the model keeps all)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    files = sorted(p for p in folder.rglob("*.jpg"))
    outs = []
    with torch.inference_mode():
        for a in range(0, len(files), batch):
            if preprocess_threads:
                torch.set_num_threads(preprocess_threads)
            x = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files[a : a + batch]])
            torch.set_num_threads(threads)
            outs.append(model.encode_image(x, normalize=True).to(torch.float16).numpy())
    return len(files), time.perf_counter() - start, np.concatenate(outs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="ViT-B-32", help="an architecture both libraries name")
    parser.add_argument("--layers", type=int, default=4, help="blocks per tower (0: the architecture's own)")
    parser.add_argument("--n", type=int, default=512, help="JPEG files")
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="mmclip DataLoader workers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_embed.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import open_clip
    from rich.console import Console
    from rich.table import Table

    mm, oc, preprocess = build(args.arch, args.layers)
    variants = {
        f"mmclip embed_corpus, {args.workers} worker{'s' if args.workers != 1 else ''}": args.workers,
        "mmclip embed_corpus, 0 workers": 0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        sizes = write_jpegs(folder, args.n, args.min_side, args.max_side)
        # warm-up (file cache, lazy imports, oneDNN kernels) on a slice
        warm = Path(tmp) / "warm"
        warm.mkdir()
        for p in sorted(folder.rglob("*.jpg"))[: 2 * args.batch]:
            os.link(p, warm / p.name)
        run_open_clip(oc, preprocess, warm, args.batch)
        shutil.rmtree(run_mmclip(mm, warm, args.batch, args.workers)[2])

        peers = {"open_clip loop": None, "open_clip loop, preprocess on 1 torch thread": 1}
        rates: dict[str, list[float]] = {k: [] for k in [*peers, *variants]}
        max_diff = 0.0
        for r in range(args.rounds):
            for name, preprocess_threads in peers.items():
                n, seconds, theirs = run_open_clip(oc, preprocess, folder, args.batch, preprocess_threads)
                rates[name].append(n / seconds)
            for name, workers in variants.items():
                n_mm, seconds, store_dir = run_mmclip(mm, folder, args.batch, workers)
                rates[name].append(n_mm / seconds)
                ours = EmbeddingStore(store_dir).embeddings(np.float32)
                shutil.rmtree(store_dir)
                max_diff = max(max_diff, float(np.abs(ours - theirs.astype(np.float32)).max()))
                assert n_mm == n, (n_mm, n)
            logging.warning("round %d/%d done", r + 1, args.rounds)

    base = statistics.median(rates["open_clip loop"])
    best = max(statistics.median(rates[name]) for name in peers)
    rows = []
    for name, values in rates.items():
        median = statistics.median(values)
        rows.append(
            {
                "pipeline": name,
                "images_per_s": round(median, 1),
                "ratio_vs_open_clip": round(median / base, 3),
                "ratio_vs_best_open_clip": round(median / best, 3),
                "rounds": [round(v, 1) for v in values],
            }
        )
    depth = f"{args.layers} layers" if args.layers else "full depth"
    table = Table(title=f"embedding {args.n} JPEGs: {args.arch} ({depth}), batch {args.batch}, fp32, CPU")
    columns = ("pipeline", "images/s", "ratio vs open_clip loop", "ratio vs best open_clip", "rounds")
    for col in columns:
        table.add_column(col, justify="left" if col in ("pipeline", "rounds") else "right")
    for row in rows:
        table.add_row(
            row["pipeline"],
            f"{row['images_per_s']:.1f}",
            f"{row['ratio_vs_open_clip']:.2f}",
            f"{row['ratio_vs_best_open_clip']:.2f}",
            ", ".join(f"{v:.1f}" for v in row["rounds"]),
        )
    console = Console(width=max(Console().width, 130))
    console.print(table)
    console.print(f"max abs difference of the embeddings (mmclip float16 store vs open_clip): {max_diff:.2e}")
    result = {
        "benchmark": "embed a folder of JPEGs: mmclip.embedding.writer.embed_corpus vs a plain open_clip loop",
        "arch": args.arch,
        "layers": args.layers or "full",
        "images": args.n,
        "image_px": {"min_side": min(min(s) for s in sizes), "max_side": max(max(s) for s in sizes)},
        "jpeg_quality": 90,
        "batch_size": args.batch,
        "mmclip_workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "max_abs_embedding_diff": max_diff,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "open_clip": open_clip.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
