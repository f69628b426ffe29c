"""Embedding a corpus on several devices or nodes: Lightning's predict loop over store shards.

:class:`EmbeddingPredictor` builds this rank's data loader (the store shards ``i % world_size == rank``
not written yet, see :func:`mmclip.embedding.writer.plan_embedding`) and embeds batches in ``predict_step``;
:class:`StoreWriterCallback` writes each shard when its last batch is through. The result is
byte-identical to :func:`mmclip.embedding.writer.embed_corpus` (one process) on the same model and arguments.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn

from mmclip.data.quality import DEFAULT_MAX_PIXELS
from mmclip.embedding.sources import EmbedBatch, EmbedSource
from mmclip.embedding.store import canonical_precision
from mmclip.embedding.writer import (
    EmbedPlan,
    EmbedResult,
    StoreWriter,
    embed_inputs,
    log_result,
    make_loader,
    plan_embedding,
    progress_bar,
)

__all__ = ["EmbeddingPredictor", "StoreWriterCallback", "embed_corpus_lightning"]

_LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


class EmbeddingPredictor(pl.LightningModule):
    """Embeds this rank's store shards in ``predict_step`` (autocast comes from the Trainer's precision).

    Args:
        model: a ``DualEncoder``.
        tokenizer: ``list[str] -> LongTensor (T, L)`` (text sources).
        source: the corpus.
        out: the store folder.
        batch_size, shard_size, num_workers, precision, model_spec, max_pixels: see
            :func:`mmclip.embedding.writer.embed_corpus`.
        channels_last: run image convolutions channels-last.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        source: EmbedSource,
        out: str | os.PathLike[str],
        *,
        batch_size: int = 256,
        shard_size: int = 10_000,
        num_workers: int = 2,
        precision: str | int = "32",
        channels_last: bool = False,
        model_spec: dict[str, Any] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__()
        self.model = model
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.tokenizer, self.source, self.out = tokenizer, source, Path(out)
        self.batch_size, self.shard_size, self.num_workers = batch_size, shard_size, num_workers
        self.precision, self.channels_last = canonical_precision(precision), channels_last
        self.model_spec, self.max_pixels = model_spec, max_pixels
        self.plan: EmbedPlan | None = None

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        self.plan = plan_embedding(
            self.model,
            self.tokenizer,
            self.source,
            self.out,
            batch_size=self.batch_size,
            shard_size=self.shard_size,
            precision=self.precision,
            model_spec=self.model_spec,
            max_pixels=self.max_pixels,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
        )
        return make_loader(self.plan.dataset, self.num_workers, pin_memory=self.device.type == "cuda")

    def transfer_batch_to_device(
        self, batch: EmbedBatch, device: torch.device, dataloader_idx: int
    ) -> EmbedBatch:
        batch.inputs = batch.inputs.to(device, non_blocking=True)  # ids, captions, labels stay on the host
        return batch

    def predict_step(self, batch: EmbedBatch, batch_idx: int) -> torch.Tensor:
        """``(B, D)`` float16 embeddings on the CPU."""
        if not len(batch):
            return torch.zeros(0, int(self.model.embed_dim), dtype=torch.float16)
        x = embed_inputs(self.model, batch.inputs, self.source.modality, None, self.channels_last)  # (B, D)
        return x.to(torch.float16).cpu()


class StoreWriterCallback(BasePredictionWriter):
    """Hands every predicted batch to a :class:`mmclip.embedding.writer.StoreWriter`; a progress bar on rank 0."""

    def __init__(self, progress: bool = True):
        super().__init__(write_interval="batch")
        self.progress = progress
        self.writer: StoreWriter | None = None
        self._bar: contextlib.ExitStack | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, EmbeddingPredictor):
            raise TypeError(
                f"StoreWriterCallback writes for an EmbeddingPredictor, not {type(pl_module).__name__}"
            )
        assert pl_module.plan is not None, "the predict data loader builds the plan first"
        self._bar = contextlib.ExitStack()
        world = trainer.world_size
        advance = self._bar.enter_context(
            progress_bar(
                pl_module.plan.todo_samples,
                self.progress and trainer.is_global_zero,
                "embedding" if world == 1 else f"embedding (rank 0 of {world})",
            )
        )
        self.writer = StoreWriter(pl_module.out, pl_module.plan.meta["dim"], on_batch=advance)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: torch.Tensor,
        batch_indices: Any,
        batch: EmbedBatch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self.writer is not None
        self.writer.add(batch, np.asarray(prediction.numpy(), dtype=np.float16))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.writer is not None and self.writer.open_shards:
            raise RuntimeError(f"shards {self.writer.open_shards} never received their last batch")


def embed_corpus_lightning(
    model: nn.Module,
    tokenizer: Any,
    source: EmbedSource,
    out: str | os.PathLike[str],
    *,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    batch_size: int = 256,
    num_workers: int = 2,
    shard_size: int = 10_000,
    precision: str | int = "32",
    channels_last: bool = False,
    progress: bool = True,
    model_spec: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> EmbedResult:
    """:func:`mmclip.embedding.writer.embed_corpus` on ``devices`` x ``num_nodes`` processes (Lightning's predict loop).

    With a subprocess-launching strategy (``ddp``) every rank runs the calling script again: call this from
    an entry point that builds the same model on every rank (``mmclip embed`` does). Returns this process's
    share of the work.
    """
    start = time.perf_counter()
    predictor = EmbeddingPredictor(
        model,
        tokenizer,
        source,
        out,
        batch_size=batch_size,
        shard_size=shard_size,
        num_workers=num_workers,
        precision=precision,
        channels_last=channels_last,
        model_spec=model_spec,
        max_pixels=max_pixels,
    )
    callback = StoreWriterCallback(progress=progress)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=_LIGHTNING_PRECISION[canonical_precision(precision)],  # type: ignore[arg-type]
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(out),
    )
    with warnings.catch_warnings():  # the writer keys batches by shard, not by sampler indices
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        trainer.predict(predictor, return_predictions=False)
    plan = predictor.plan
    assert plan is not None, "predict_dataloader() builds the plan"
    writer = callback.writer or StoreWriter(out, plan.meta["dim"])  # no batch ran at all
    result = EmbedResult(
        out=Path(out),
        num_samples=plan.meta["num_samples"],
        num_shards=plan.meta["num_shards"],
        shards_written=writer.shards_written,
        shards_already_done=len(range(trainer.global_rank, plan.meta["num_shards"], trainer.world_size))
        - len(plan.shards),
        embedded=writer.embedded,
        skipped=dict(writer.skipped),
        seconds=time.perf_counter() - start,
    )
    log_result(result)
    return result
