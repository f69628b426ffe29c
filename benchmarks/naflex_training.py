"""NaFlex training on the CPU: how to batch it, and what native aspect ratios buy.

Two measurements on the recipe ``experiment=siglip2_naflex_tiny`` (a tiny SigLIP 2 NaFlex ViT, 64 patches of
8 px per image, on the synthetic shapes at varied aspect ratios):

1. **Speed of the two NaFlex batchings** (``data.naflex_batching``), same patch budget per batch
   (batch size x 64 patches): "fixed" (every image padded to 64 patches, fixed images per batch) against
   "budget" (each batch draws 16, 32, 48 or 64 patches per image and holds as many images as fit). Batches
   are built first, then training steps (forward, SigLIP loss, backward, AdamW) on them are timed, the two
   alternating in rounds. The table gives images/s, real (unpadded) patches/s and milliseconds per step.
2. **Native aspect ratio against square centre crops.** ``mmclip train experiment=siglip2_naflex_tiny`` runs
   as a subprocess with the recipe's own budget (steps, batch, patches per image), once as it is and once with
   ``data.naflex=false`` (the same model fed 64 x 64 centre crops: the same 64 patches). Each run's report
   gives zero-shot top-1 on held-out wide and tall single-shape images and text -> image retrieval.

    python benchmarks/naflex_training.py                   # both (about 8 minutes on 2 cores)
    python benchmarks/naflex_training.py --skip-accuracy   # the speed table only (about 1 minute)

Prints the tables and writes benchmarks/results/naflex_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RECIPE = "experiment=siglip2_naflex_tiny"


def build(batching: str, batch_size: int) -> tuple[Any, Any]:
    from hydra.utils import instantiate

    from mmclip.cli.recipe import compose

    cfg = compose("train", [RECIPE, f"data.naflex_batching={batching}", f"data.batch_size={batch_size}", "data.num_workers=0"])
    task = instantiate(cfg.task)
    data = instantiate(cfg.data)
    data.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    return task, data


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    from mmclip.tasks.optim import build_optimizer

    runs = {}
    for batching in ("fixed", "budget"):
        torch.manual_seed(0)
        task, data = build(batching, args.batch)
        loader = iter(data.train_dataloader(0, 1))
        batches = [next(loader) for _ in range(args.steps)]
        optimizer = build_optimizer(task.optimized_module(), **task.optimizer_spec)
        runs[batching] = (task, optimizer, batches)

    def step(task: Any, optimizer: Any, batch: Any) -> None:
        loss = task.loss(task.model(batch.images, batch.input_ids))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (task, optimizer, batches) in runs.items():
            task.train()
            start = time.perf_counter()
            for batch in batches:
                step(task, optimizer, batch)
            if r:
                seconds[name].append(time.perf_counter() - start)
        print(f"speed round {r}/{args.rounds} done", file=sys.stderr)
    rows = []
    for name, (_, _, batches) in runs.items():
        t = statistics.median(seconds[name])
        images = sum(len(b) for b in batches)
        real = sum(int(b.images.mask.sum()) for b in batches)
        padded = sum(b.images.mask.numel() for b in batches)
        rows.append(
            {
                "batching": name,
                "steps": len(batches),
                "images": images,
                "images_per_s": round(images / t, 1),
                "real_patches_per_s": round(real / t),
                "padding_fraction": round(1 - real / padded, 3),
                "ms_per_step": round(1000 * t / len(batches), 1),
                "images_per_batch": sorted({len(b) for b in batches}),
                "rounds_s": [round(x, 2) for x in seconds[name]],
            }
        )
    base = rows[0]
    for row in rows:
        row["images_per_s_vs_fixed"] = round(row["images_per_s"] / base["images_per_s"], 3)
        row["real_patches_per_s_vs_fixed"] = round(row["real_patches_per_s"] / base["real_patches_per_s"], 3)
    return rows


def accuracy(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    arms = {
        "native aspect (NaFlex)": [],
        "square centre crops": ["data.naflex=false"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in arms.items():
            run_dir = Path(tmp) / name.split()[0]
            cmd = [sys.executable, "-m", "mmclip.cli.main", "train", RECIPE, f"run_dir={run_dir}", "callbacks=none",
                   "logger=none", *extra, *args.overrides]
            print("$", " ".join(cmd[2:]), file=sys.stderr)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            wall = time.perf_counter() - start
            metrics = json.loads((run_dir / "report" / "metrics.json").read_text())["metrics"]
            rows.append(
                {
                    "images": name,
                    "overrides": extra + args.overrides,
                    "zeroshot_top1_wide_tall": round(metrics["zeroshot/top1"], 4),
                    "zeroshot_top5_wide_tall": round(metrics["zeroshot/top5"], 4),
                    "t2i_R@1": round(metrics["retrieval/t2i_R@1"], 4),
                    "i2t_R@1": round(metrics["retrieval/i2t_R@1"], 4),
                    "wall_s": round(wall, 1),
                }
            )
    return rows


def _print(rows: list[dict[str, Any]], keys: list[str]) -> None:
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps per round (speed)")
    parser.add_argument("--batch", type=int, default=64, help="images per fixed batch (speed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra recipe overrides for both accuracy runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "naflex_training.json"))
    args = parser.parse_args()

    result: dict[str, Any] = {
        "recipe": RECIPE,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
    }
    result["speed"] = speed(args)
    print("\nNaFlex batching, same patch budget per batch (training step on prepared batches):")
    _print(result["speed"], ["batching", "images_per_s", "real_patches_per_s", "padding_fraction", "ms_per_step",
                             "images_per_s_vs_fixed", "real_patches_per_s_vs_fixed"])
    if not args.skip_accuracy:
        result["accuracy"] = accuracy(args)
        print("\nNative aspect ratio vs square centre crops (same model, steps and patches per image):")
        _print(result["accuracy"], ["images", "zeroshot_top1_wide_tall", "zeroshot_top5_wide_tall", "t2i_R@1",
                                    "i2t_R@1", "wall_s"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
