"""Where the demo's time goes: the data worker's batch production vs the training step, measured apart.

The demo (`make demo`, recipe `experiment=shapes_tiny`) trains with one loader worker beside the main
process on a 2-core machine. This script times, in one process and with nothing else running:

- data: seconds per training batch the synthetic data module produces (render, transform, tokenize, collate);
- step: seconds per training step (forward, CLIP loss, backward, AdamW) on batches made in advance;

each at 1 and 2 torch threads, so the table says which side bounds the demo and which thread split fits.

    python benchmarks/profile_demo.py [--batches 20]

Prints a table and writes benchmarks/results/profile_demo.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mmclip.cli.train import build_task, compose

OUT = Path(__file__).resolve().parent / "results" / "profile_demo.json"


def _time_data(cfg, task, n: int) -> float:
    from hydra.utils import instantiate

    data = instantiate(cfg.data, num_workers=0)
    data.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    next(loader)  # warm-up
    start = time.perf_counter()
    for _ in range(n):
        next(loader)
    return (time.perf_counter() - start) / n


def _time_step(cfg, task, n: int) -> float:
    from hydra.utils import instantiate

    data = instantiate(cfg.data, num_workers=0)
    data.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(4)]
    from mmclip.tasks.optim import build_optimizer

    opt = build_optimizer(task.model, **task.optimizer_spec)
    times = []
    for i in range(n + 2):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        loss = task.loss(task.model(batch.images, batch.input_ids))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=20)
    args = p.parse_args()
    cfg = compose("train", ["experiment=shapes_tiny"])
    task = build_task(cfg)
    task.model.train()
    batch = int(cfg.data.batch_size)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        data_s = _time_data(cfg, task, args.batches)
        step_s = _time_step(cfg, task, args.batches)
        rows.append({"threads": threads, "data_s_per_batch": data_s, "step_s": step_s,
                     "data_samples_per_s": batch / data_s, "step_samples_per_s": batch / step_s})
    print(f"shapes_tiny demo, batch {batch}, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'threads':>7} | {'data s/batch':>12} | {'step s':>7} | {'data samples/s':>14} | {'step samples/s':>14}")
    for r in rows:
        print(f"{r['threads']:>7} | {r['data_s_per_batch']:>12.3f} | {r['step_s']:>7.3f} | "
              f"{r['data_samples_per_s']:>14.0f} | {r['step_samples_per_s']:>14.0f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"batch_size": batch, "rows": rows, "torch": torch.__version__}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
