"""LiT from cached embeddings vs LiT with the frozen image tower in memory: same recall, less time per step.

Both runs train the same text tower (same init, copied) against the same frozen image tower, with the same
optimizer, schedule, batch size and number of steps, on the same synthetic batches in the same order (both
loaders are map-style over the same samples: same permutation per epoch, same caption picked per sample).

- **in memory**: ``ContrastiveTask`` with ``lock_image``; every step renders the images, transforms them
  without augmentation (``scale=(1, 1)``, ``ratio=(1, 1)``: on the square synthetic images that is exactly
  the evaluation transform) and runs the frozen tower;
- **cached**: the images are written once as webdataset shards and embedded once by ``mmclip.embedding.writer``
  (``embed_corpus``, evaluation transform, float16 store); the run reads the store with
  ``CachedEmbeddingDataModule`` into a ``DualEncoder`` with the ``precomputed`` image tower.

Afterwards text->image and image->text recall@1 on the validation split (the in-memory model on rendered
images, the cached one on the embedded validation shards). Time per training step (data loading in the
main process included: next batch, forward, loss, backward, AdamW step) is measured after training in
rounds that alternate between the two pipelines, so drifts in the speed of a shared machine hit both; the
median over rounds is reported (the median step time inside each ``fit`` is kept in the JSON too). The
one-off embedding time is reported separately.

    python benchmarks/bench_lit_cache.py                                   # random-init frozen tiny ViT
    python benchmarks/bench_lit_cache.py --checkpoint runs/x/checkpoints/last.ckpt   # a trained tower

``--checkpoint`` is a ContrastiveTask checkpoint of the shapes_tiny architecture (vit_tiny + embed 128): its
image tower and image projection are frozen; the text tower starts from a fresh init either way.
Prints a table and writes benchmarks/results/bench_lit_cache.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from mmclip.data import CachedEmbeddingDataModule, SyntheticDataModule
from mmclip.data.synthetic import write_webdataset
from mmclip.embedding.sources import ShardsSource
from mmclip.embedding.writer import EmbeddingStore, embed_corpus
from mmclip.evaluation import eval_mode, run_retrieval
from mmclip.tasks.contrastive import ContrastiveTask
from mmclip.tasks.optim import build_optimizer

# the shapes_tiny demo's architecture (recipes/image_tower/vit_tiny.yaml, text_tower/clip_text_tiny.yaml)
IMAGE_TOWER = {"name": "clip_vit", "image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "heads": 4}
TEXT_TOWER = {
    "name": "clip_text",
    "vocab_size": 49408,
    "context_length": 32,
    "width": 128,
    "layers": 4,
    "heads": 4,
}
EMBED_DIM = 128


class StepTimer(pl.Callback):
    """Wall-clock time between consecutive training-batch ends (data loading + step), and the last loss."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.last_loss = float("nan")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.stamps.append(time.perf_counter())
        self.last_loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)

    def per_step(self, skip: int = 10) -> float:
        deltas = np.diff(self.stamps[skip:])
        return float(statistics.median(deltas)) if len(deltas) else float("nan")


def _trainer(steps: int, timer: StepTimer) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "text_tower": TEXT_TOWER,
        "optimizer": {"lr": args.lr, "weight_decay": 0.1},
        "scheduler": {"name": "cosine", "warmup_steps": args.warmup},
    }


def build_tasks(args: argparse.Namespace) -> tuple[ContrastiveTask, ContrastiveTask]:
    """The in-memory LiT task and the cached one, with the same text tower, projection and temperature."""
    pl.seed_everything(args.seed, verbose=False)
    memory = ContrastiveTask(
        model=None,
        image_tower=IMAGE_TOWER,
        model_kwargs={"embed_dim": EMBED_DIM},
        lock_image={"unlocked_groups": 0},
        **_common(args),
    )
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        image = {
            k.removeprefix("model."): v
            for k, v in state.items()
            if k.startswith(("model.image_tower.", "model.image_proj."))
        }
        missing, unexpected = memory.model.load_state_dict(image, strict=False)
        if unexpected or any(k.startswith(("image_tower.", "image_proj.")) for k in missing):
            raise SystemExit(
                f"{args.checkpoint} does not fit the vit_tiny image tower: {unexpected or missing}"
            )
    cached = ContrastiveTask(
        model=None,
        image_tower={"name": "precomputed", "dim": EMBED_DIM},
        model_kwargs={"embed_dim": EMBED_DIM, "image_proj": "none"},
        **_common(args),
    )
    shared = {
        k: v
        for k, v in memory.model.state_dict().items()
        if not k.startswith(("image_tower.", "image_proj."))
    }
    cached.model.load_state_dict(shared, strict=True)
    return memory, cached


def embed_split(task: ContrastiveTask, wds: Path, split: str, n: int, out: Path, shard_size: int) -> float:
    """Writes ``n`` samples of ``split`` as shards and embeds them into ``out``; returns the embedding seconds."""
    write_webdataset(wds, split, n, shard_size=shard_size, image_size=64)
    tars = sorted(wds.glob(f"{split}-*.tar"))
    pattern = str(wds / f"{split}-{{000000..{len(tars) - 1:06d}}}.tar")
    start = time.perf_counter()
    embed_corpus(
        task.model,
        task.tokenizer,
        ShardsSource(pattern),
        out,
        batch_size=256,
        num_workers=0,
        shard_size=shard_size,
        progress=False,
    )
    return time.perf_counter() - start


def time_steps(task: ContrastiveTask, datamodule: Any, steps: int, rounds_out: list[float]) -> None:
    """Appends the mean seconds of ``steps`` full training steps (data included) on a copy of ``task``."""
    model = copy.deepcopy(task.model).train()
    optimizer = build_optimizer(model, lr=1e-5)
    batches = iter(datamodule.train_dataloader(0, 1))
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        loss = task.loss(model(batch.images, batch.input_ids))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    rounds_out.append((time.perf_counter() - start) / steps)


def fit(task: ContrastiveTask, datamodule: Any, steps: int, seed: int) -> StepTimer:
    timer = StepTimer()
    datamodule.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    pl.seed_everything(seed, verbose=False)
    _trainer(steps, timer).fit(task, datamodule=datamodule)
    return timer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=12800)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared 2-core machine)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--round-steps", type=int, default=10, help="training steps per timing round")
    parser.add_argument(
        "--checkpoint", default=None, help="ContrastiveTask .ckpt whose image tower is frozen"
    )
    parser.add_argument("--work", default=None, help="folder for the shards and stores (default: a temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_lit_cache.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        memory, cached = build_tasks(args)
        shard = 2048
        embed_s = embed_split(memory, work / "wds", "train", args.n_train, work / "emb" / "train", shard)
        embed_s += embed_split(memory, work / "wds", "val", args.n_val, work / "emb" / "val", shard)

        images = SyntheticDataModule(
            n_train=args.n_train,
            n_val=args.n_val,
            n_test=0,
            image_size=64,
            batch_size=args.batch,
            num_workers=0,
            seed=args.seed,
            scale=(1.0, 1.0),
            ratio=(1.0, 1.0),
        )
        store = CachedEmbeddingDataModule(
            train_store=str(work / "emb" / "train"),
            val_store=str(work / "emb" / "val"),
            batch_size=args.batch,
            num_workers=0,
            seed=args.seed,
        )
        # the same samples in the same order with the same captions, and the same image embeddings
        images.configure(data_config=memory.data_config, tokenizer=memory.tokenizer)
        store.configure(data_config=cached.data_config, tokenizer=cached.tokenizer)
        a, b = next(iter(images.train_dataloader(0, 1))), next(iter(store.train_dataloader(0, 1)))
        assert a.keys == b.keys and a.captions == b.captions, "the two loaders disagree on the first batch"
        with torch.no_grad(), eval_mode(memory.model):
            live = memory.model.encode_image(a.images, normalize=True)  # (B, E)
        embed_err = float((live - b.images).abs().max())
        store_rows = len(EmbeddingStore(work / "emb" / "train"))

        t_memory = fit(memory, images, args.steps, args.seed)
        t_cached = fit(cached, store, args.steps, args.seed)
        r_memory = run_retrieval(memory.model, images.retrieval_dataloader("val"), distributed=False)
        r_cached = run_retrieval(cached.model, store.retrieval_dataloader("val"), distributed=False)
        timing: dict[str, list[float]] = {"in_memory": [], "cached": []}
        for _ in range(args.rounds):
            time_steps(memory, images, args.round_steps, timing["in_memory"])
            time_steps(cached, store, args.round_steps, timing["cached"])
        text_ids = a.input_ids[:16]
        with torch.no_grad(), eval_mode(memory.model), eval_mode(cached.model):
            drift = float(
                (
                    memory.model.encode_text(text_ids, normalize=True)
                    - cached.model.encode_text(text_ids, normalize=True)
                )
                .abs()
                .max()
            )

    rows = {
        "in_memory": {
            "t2i_R@1": r_memory["t2i_R@1"],
            "i2t_R@1": r_memory["i2t_R@1"],
            "t2i_R@5": r_memory["t2i_R@5"],
            "s_per_step": statistics.median(timing["in_memory"]),
            "s_per_step_rounds": timing["in_memory"],
            "s_per_step_in_fit": t_memory.per_step(),
            "final_loss": t_memory.last_loss,
        },
        "cached": {
            "t2i_R@1": r_cached["t2i_R@1"],
            "i2t_R@1": r_cached["i2t_R@1"],
            "t2i_R@5": r_cached["t2i_R@5"],
            "s_per_step": statistics.median(timing["cached"]),
            "s_per_step_rounds": timing["cached"],
            "s_per_step_in_fit": t_cached.per_step(),
            "final_loss": t_cached.last_loss,
        },
    }
    result = {
        "image_tower": IMAGE_TOWER,
        "text_tower": TEXT_TOWER,
        "checkpoint": args.checkpoint,
        "n_train": args.n_train,
        "n_val": args.n_val,
        "batch": args.batch,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "store_rows": store_rows,
        "embed_seconds_once": embed_s,
        "max_abs_diff_live_vs_stored_image_embedding": embed_err,
        "max_abs_diff_final_text_embedding": drift,
        "chance_t2i_R@1": 1.0 / args.n_val,
        "runs": rows,
        "speedup_per_step": rows["in_memory"]["s_per_step"] / rows["cached"]["s_per_step"],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    print(
        f"LiT on {args.n_train} synthetic scenes, {args.steps} steps of {args.batch}, frozen vit_tiny "
        f"({'checkpoint ' + args.checkpoint if args.checkpoint else 'random init'}); val: {args.n_val} images"
    )
    print(f"{'run':<10} {'t2i R@1':>8} {'i2t R@1':>8} {'t2i R@5':>8} {'s/step':>8} {'final loss':>11}")
    for name, r in rows.items():
        print(
            f"{name:<10} {r['t2i_R@1']:>8.3f} {r['i2t_R@1']:>8.3f} {r['t2i_R@5']:>8.3f} "
            f"{r['s_per_step']:>8.3f} {r['final_loss']:>11.4f}"
        )
    print(
        f"speed-up per step x{result['speedup_per_step']:.2f}; embedding the {store_rows} + {args.n_val} images "
        f"once: {embed_s:.1f} s; live vs stored image embedding max |diff| {embed_err:.2e}; final text "
        f"embeddings max |diff| {drift:.2e}; chance t2i R@1 {1 / args.n_val:.3f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
