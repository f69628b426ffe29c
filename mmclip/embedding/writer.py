"""Embed a corpus with a DualEncoder into an embedding store, resumably.

The store format (``meta.json``, ``emb-{i:05d}.npy``, ``ids-{i:05d}.parquet``) and its reader
:class:`EmbeddingStore` live in :mod:`mmclip.embedding.store` (re-exported here). Store shard ``i``
holds source positions ``[i * S, min((i + 1) * S, N))``, so shards are independent units of work:

* :func:`embed_corpus` runs in this process (any device): ``meta.json`` is written (or checked, on a
  resumed run), the shards without an ids file are read by DataLoader workers (whole shards per worker,
  :class:`mmclip.embedding.sources.EmbedDataset`), embedded in batches under ``torch.inference_mode``
  (optional bf16 / fp16 autocast and channels-last), and each shard is written by :class:`StoreWriter`
  when its last batch is through;
* ``mmclip.embedding.predict.embed_corpus_lightning`` runs the same pieces in Lightning's predict loop on
  several devices or nodes (rank ``r`` of ``W`` takes the shards ``i % W == r``).

Both write byte-identical stores, and a run killed at any point and started again with the same
arguments ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmclip.data.quality import DEFAULT_MAX_PIXELS
from mmclip.embedding.sources import EmbedBatch, EmbedDataset, EmbedSource, make_loader
from mmclip.embedding.store import (
    FORMAT,
    EmbeddingStore,
    StoreMismatchError,
    _write_emb,
    canonical_precision,
    ids_table,
    prepare_store,
    store_meta,
    write_embeddings,
    write_shard,
)

__all__ = [
    "FORMAT",
    "EmbedPlan",
    "EmbedResult",
    "EmbeddingStore",
    "StoreMismatchError",
    "StoreWriter",
    "amp_dtype",
    "embed_corpus",
    "embed_inputs",
    "make_loader",
    "plan_embedding",
    "write_embeddings",
]

logger = logging.getLogger(__name__)

_KILL_ENV = "MMCLIP_EMBED_TEST_KILL_AFTER"  # test hook, see StoreWriter
_PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def amp_dtype(precision: str | int) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32)."""
    return _PRECISIONS[canonical_precision(precision)]


class StoreWriter:
    """Collects each shard's batches and writes the shard when its last batch arrives.

    Batches of different shards may interleave (DataLoader workers each produce whole shards); batches of
    one shard arrive in order.

    Test hook: with the environment variable ``MMCLIP_EMBED_TEST_KILL_AFTER=K`` the process kills itself
    (SIGKILL) after it wrote ``K`` whole shards and the embeddings file of the next one, before that
    shard's ids file: the state a crash at the worst moment leaves behind.

    Args:
        out: the store folder (``meta.json`` already written by :func:`prepare_store`).
        dim: embedding width.
        on_batch: called with the number of source samples each batch accounts for (progress).
    """

    def __init__(self, out: str | os.PathLike[str], dim: int, on_batch: Callable[[int], None] | None = None):
        self.out = Path(out)
        self.dim = int(dim)
        self.on_batch = on_batch
        self._pending: dict[int, list[tuple[EmbedBatch, np.ndarray]]] = {}
        self.embedded = 0
        self.skipped: Counter[str] = Counter()
        self.shards_written = 0
        kill = os.environ.get(_KILL_ENV)
        self._kill_after = int(kill) if kill else None

    def add(self, batch: EmbedBatch, embeds: np.ndarray) -> None:
        """One embedded batch (``embeds``: ``(B, D)`` float16)."""
        if embeds.shape != (len(batch), self.dim):
            raise ValueError(f"expected embeddings of shape {(len(batch), self.dim)}, got {embeds.shape}")
        self._pending.setdefault(batch.shard, []).append((batch, embeds))
        for reason, n in batch.skipped.items():
            self.skipped[reason] += n
        if self.on_batch is not None:
            self.on_batch(batch.seen)
        if batch.last:
            self._write(batch.shard, self._pending.pop(batch.shard))

    def _write(self, shard: int, parts: list[tuple[EmbedBatch, np.ndarray]]) -> None:
        batches = [b for b, _ in parts]
        embeds = np.concatenate([e for _, e in parts]) if parts else np.zeros((0, self.dim), np.float16)
        captions = None if batches[0].captions is None else [c for b in batches for c in b.captions or []]
        labels = None if batches[0].labels is None else [v for b in batches for v in b.labels or []]
        index = [int(i) for b in batches for i in b.index.tolist()]
        table = ids_table(index, [i for b in batches for i in b.ids], captions, labels)
        if self._kill_after is not None and self.shards_written >= self._kill_after:
            _write_emb(self.out, shard, embeds)  # ... and die before the ids file
            os.kill(os.getpid(), signal.SIGKILL)
        write_shard(self.out, shard, embeds, table)
        self.embedded += len(index)
        self.shards_written += 1

    @property
    def open_shards(self) -> list[int]:
        """Shards with batches received but not yet written."""
        return sorted(self._pending)


def embed_inputs(
    model: nn.Module,
    inputs: torch.Tensor,
    modality: str,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """``(B, D)`` float32 L2-normalised embeddings of images ``(B, 3, H, W)`` (or ``NaFlexImages``) or token
    ids ``(B, L)``.

    Call it under ``torch.inference_mode()`` with the model in eval mode and on ``inputs``' device.
    """
    device = inputs.device
    with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        if modality == "image":
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            images = inputs.to(dtype)
            if channels_last and isinstance(images, torch.Tensor):
                images = images.contiguous(memory_format=torch.channels_last)
            x = model.encode_image(images)  # (B, D)
        elif modality == "text":
            x = model.encode_text(inputs)  # (B, D)
        else:
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    with torch.autocast(device.type, enabled=False):  # normalise in fp32, also inside an outer autocast
        return F.normalize(x.float(), dim=-1)  # (B, D)


@dataclass
class EmbedResult:
    """What a run did (this process's share in multi-process runs)."""

    out: Path
    num_samples: int
    num_shards: int
    shards_written: int
    shards_already_done: int
    embedded: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def default_model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"config": model.config}`` (the architecture only; pass a spec with a checkpoint to rebuild weights)."""
    return {"config": getattr(model, "config", None)}


@dataclass
class EmbedPlan:
    """Everything a run needs before its first batch (shared by the plain and the Lightning path)."""

    source: EmbedSource
    meta: dict[str, Any]
    shards: list[int]
    dataset: EmbedDataset

    @property
    def todo_samples(self) -> int:
        s, n = self.meta["shard_size"], self.meta["num_samples"]
        return sum(min(s, n - i * s) for i in self.shards)


def plan_embedding(
    model: nn.Module,
    tokenizer: Any,
    source: EmbedSource,
    out: str | os.PathLike[str],
    *,
    batch_size: int,
    shard_size: int,
    precision: str | int = "32",
    model_spec: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rank: int = 0,
    world_size: int = 1,
) -> EmbedPlan:
    """Writes or checks ``meta.json`` and builds the data set of this rank's remaining shards."""
    from mmclip.data.transforms import image_transform

    meta = store_meta(
        modality=source.modality,
        dim=int(model.embed_dim),
        shard_size=shard_size,
        num_samples=len(source),
        model=model_spec if model_spec is not None else default_model_spec(model),
        source=source.spec(),
        precision=precision,
    )
    shards = prepare_store(out, meta, rank, world_size)
    transform = image_transform(model.data_config, train=False) if source.modality == "image" else None
    dataset = EmbedDataset(
        source,
        shards,
        shard_size,
        batch_size,
        transform=transform,
        tokenizer=tokenizer if source.modality == "text" else None,
        max_pixels=max_pixels,
    )
    return EmbedPlan(source=source, meta=meta, shards=shards, dataset=dataset)


@contextlib.contextmanager
def progress_bar(
    total: int, enabled: bool = True, description: str = "embedding"
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` samples; yields its ``advance(n)`` (a no-op when disabled)."""
    if not enabled or total <= 0:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[progress.percentage]{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def log_result(result: EmbedResult) -> None:
    skipped = sum(result.skipped.values())
    detail = ", ".join(f"{r}: {n}" for r, n in Counter(result.skipped).most_common())
    logger.info(
        "embedded %d samples into %d new shards of %s (%d of %d shards were already done) in %.1f s; "
        "skipped %d samples%s",
        result.embedded,
        result.shards_written,
        result.out,
        result.shards_already_done,
        result.num_shards,
        result.seconds,
        skipped,
        f" ({detail})" if detail else "",
    )


def embed_corpus(
    model: nn.Module,
    tokenizer: Any,
    source: EmbedSource,
    out: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    shard_size: int = 10_000,
    device: str | torch.device | None = None,
    precision: str | int = "32",
    channels_last: bool = False,
    progress: bool = True,
    model_spec: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> EmbedResult:
    """Embeds ``source`` into the store ``out`` in this process, skipping shards already there.

    Args:
        model: a ``DualEncoder`` (``encode_image`` / ``encode_text``, ``data_config``, ``embed_dim``).
        tokenizer: ``list[str] -> LongTensor (T, L)`` (text sources).
        source: the corpus (``mmclip.embedding.sources.build_source``).
        out: the store folder.
        batch_size: samples per forward pass.
        num_workers: DataLoader worker processes decoding images (0: in this process).
        shard_size: samples per output shard.
        device: where to run (default: the model's device; the model is moved there).
        precision: "32", or "bf16" / "16" autocast (Lightning names such as "bf16-mixed" work too).
        channels_last: run image convolutions channels-last (the model's 4-D weights are converted).
        progress: show a progress bar.
        model_spec: plain spec that rebuilds the model, for ``meta.json`` (the CLI gives the recipe's model
            nodes and checkpoint); default ``{"config": model.config}``.
        max_pixels: decompression-bomb ceiling.

    Raises:
        StoreMismatchError: ``out`` holds a store of another model, source, shard size or precision.
    """
    start = time.perf_counter()
    plan = plan_embedding(
        model,
        tokenizer,
        source,
        out,
        batch_size=batch_size,
        shard_size=shard_size,
        precision=precision,
        model_spec=model_spec,
        max_pixels=max_pixels,
    )
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp = amp_dtype(precision)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    loader = make_loader(plan.dataset, num_workers, pin_memory=dev.type == "cuda")
    try:
        with progress_bar(plan.todo_samples, progress) as advance, torch.inference_mode():
            writer = StoreWriter(out, plan.meta["dim"], on_batch=advance)
            for batch in loader:
                if len(batch):
                    inputs = batch.inputs.to(dev, non_blocking=True)
                    embeds = embed_inputs(model, inputs, source.modality, amp, channels_last)  # (B, D)
                    emb16 = embeds.to(torch.float16).cpu().numpy()
                else:
                    emb16 = np.zeros((0, plan.meta["dim"]), np.float16)
                writer.add(batch, emb16)
    finally:
        for m, training in flags:
            m.training = training
    if writer.open_shards:
        raise RuntimeError(f"shards {writer.open_shards} never received their last batch (a data loader bug)")
    result = EmbedResult(
        out=Path(out),
        num_samples=plan.meta["num_samples"],
        num_shards=plan.meta["num_shards"],
        shards_written=writer.shards_written,
        shards_already_done=plan.meta["num_shards"] - len(plan.shards),
        embedded=writer.embedded,
        skipped=dict(writer.skipped),
        seconds=time.perf_counter() - start,
    )
    log_result(result)
    return result
