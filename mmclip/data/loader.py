"""Resumable, rank-aware loading for map-style sources (synthetic scenes, HF datasets, CSV rows).

:class:`ResumableLoader` is what ``train_dataloader()`` returns. It has ``__len__`` (batches per epoch on
this rank) and ``state_dict()`` / ``load_state_dict()``, which Lightning calls when it checkpoints and
resumes: because the loader is sized, Lightning does not prefetch, so the number of batches the loader has
yielded when a checkpoint is written is the number the model consumed. The loader keeps its own epoch
counter: every ``iter()`` after the first starts the next epoch (the body runs at the first ``next()``, so
a bare ``iter()`` probe changes nothing), and an ``iter()`` after ``load_state_dict`` continues the saved
epoch where it stopped. It counts every batch's skips and used samples in its :class:`SkipStats` (the data
module's ``skip_stats``) and raises :class:`DataQualityError` when the skipped fraction passes its ceiling or
when a whole pass over this rank's share gave no usable sample.

Epochs are exactly-once. For map-style sources (:class:`MapLoader`) each epoch is a permutation of the data
seeded by (seed, epoch); rank ``r`` of ``R`` takes every ``R``-th index of it, all of them. Workers prepare
*chunks* of ``batch_size`` consecutive indices of that order (decode, transform, tokenize; unusable samples
are dropped and counted) and the main process packs the usable samples into batches in order: a skipped
sample is gone for the epoch and its place is filled by the next samples, never by a repeat. Every rank
yields ``ceil(ceil(N / R) / batch_size)`` batches per epoch (the same number on every rank); the last ones
of a rank may be short, or empty (zero rows, carrying skip counts) once its share is used up. Resuming
restarts at the chunk of the next unused sample. Per-sample randomness is seeded from (seed, epoch, index).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mmclip.data.batch import ImageTextBatch
from mmclip.data.collate import (
    ProcessedSample,
    RawSample,
    SampleProcessor,
    collate,
    concat_batches,
    empty_batch,
    sample_rng,
    sample_seed,
    slice_batch,
)
from mmclip.data.quality import SkipStats

__all__ = ["BudgetMapLoader", "MapEvalDataset", "MapLoader", "MapSource", "ResumableLoader", "epoch_permutation"]

logger = logging.getLogger(__name__)


class MapSource(Protocol):
    """A random-access data source: ``len(source)`` samples, ``source.get(i) -> RawSample``."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> RawSample: ...


def _identity(x: Any) -> Any:
    return x


class ResumableLoader:
    """Base of the training loaders: epoch counting, ``__len__``, ``state_dict`` / ``load_state_dict``.

    Subclasses implement :meth:`_epoch_batches`, an iterator over the epoch's batches starting after
    ``consumed`` batches, and may add state with :meth:`_extra_state` / :meth:`_on_batch`.

    Args:
        num_batches: batches per epoch on this rank.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0 builds batches in the main process).
        pin_memory: pin batches for faster host-to-GPU copies.
        prefetch_factor: batches each worker prepares ahead.
        skip_stats: where skips and used samples are counted, with the ceiling (default: a fresh
            :class:`SkipStats`).
    """

    def __init__(
        self,
        num_batches: int,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        skip_stats: SkipStats | None = None,
    ):
        self.skip_stats = skip_stats if skip_stats is not None else SkipStats()
        self._epoch_ok = 0  # usable samples yielded in the current epoch
        self._exhausted = False  # set by subclasses: this rank's share of the epoch is used up
        self.num_batches = int(num_batches)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.epoch = 0
        self._consumed = 0
        self._started = False
        self._resume: dict[str, Any] | None = None
        self._live: Iterator[ImageTextBatch] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def _dataloader(self, dataset: Dataset | IterableDataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            collate_fn=_identity,
            **kwargs,
        )

    def __iter__(self) -> Iterator[ImageTextBatch]:
        # A generator: nothing happens until the first next(), so iter() probes do not start an epoch.
        if self._live is not None:
            self._live.close()  # shuts the previous epoch's workers down now
        self._live = None
        resume, self._resume = self._resume, None
        if resume is not None:
            epoch, consumed = int(resume["epoch"]), int(resume["consumed"])
            if consumed >= self.num_batches:
                epoch, consumed, resume = epoch + 1, 0, None
        elif self._started:
            epoch, consumed = self.epoch + 1, 0
        else:
            epoch, consumed = self.epoch, 0
        self._started = True
        self.epoch, self._consumed = epoch, consumed
        if consumed:
            logger.info("Resuming epoch %d of the training data after %d batches.", epoch, consumed)
        self._epoch_ok = int(resume.get("epoch_ok", 0)) if resume is not None else 0
        self._exhausted = False
        self._begin_epoch(resume)
        batches = self._epoch_batches(epoch, consumed)
        self._live = batches
        try:
            while self._consumed < self.num_batches:
                item = next(batches, None)
                if item is None:
                    raise RuntimeError(
                        f"the training data ended after {self._consumed} of {self.num_batches} batches in epoch "
                        f"{epoch}; this is a bug in mmclip's loader (please report it)"
                    )
                batch = self._on_batch(item)
                self._consumed += 1
                self._epoch_ok += len(batch)
                self.skip_stats.count(batch.skipped, len(batch))  # raises above the ceiling
                if self._exhausted and self._epoch_ok == 0:
                    raise self.skip_stats.nothing_usable(
                        f"this rank's share of the training data (epoch {epoch})"
                    )
                yield batch
        finally:
            if self._live is batches:
                batches.close()  # type: ignore[attr-defined]
                self._live = None

    def _begin_epoch(self, resume: dict[str, Any] | None) -> None:
        """Prepare per-epoch bookkeeping (``resume`` is the loaded state when continuing an epoch)."""

    def _epoch_batches(self, epoch: int, consumed: int) -> Iterator[Any]:
        raise NotImplementedError

    def _on_batch(self, item: Any) -> ImageTextBatch:
        return item

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _fingerprint(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches, "batch_size": self.batch_size}

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: epoch, batches consumed in it, and what is needed to continue exactly."""
        return {
            "epoch": self.epoch,
            "consumed": self._consumed,
            "epoch_ok": self._epoch_ok,
            **self._fingerprint(),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next ``iter()``.

        If the data layout changed (world size, batch size, workers, data size), the saved epoch cannot be
        continued exactly; the loader logs a warning and starts the next epoch instead.
        """
        changed = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if changed:
            logger.warning(
                "Training data layout changed since the checkpoint (%s: saved, now); starting epoch %d afresh "
                "instead of resuming mid-epoch.",
                ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()),
                int(state["epoch"]) + 1,
            )
            self._resume = {"epoch": int(state["epoch"]), "consumed": self.num_batches}
        else:
            self._resume = dict(state)
        self._started = True


@dataclass
class _Request:
    """One chunk of training samples to prepare: its epoch, its index in the rank's order, its indices."""

    epoch: int
    chunk: int
    indices: list[int]
    max_num_patches: int | None = None  # a NaFlex budget batch's patches per image


@dataclass
class _Chunk:
    """The usable samples of one :class:`_Request`, collated (``None`` if none was usable), and its skips."""

    chunk: int
    batch: ImageTextBatch | None
    skipped: dict[str, int] = field(default_factory=dict)


class _MapTrainDataset(Dataset):
    """Prepares chunks of training samples in the workers from :class:`_Request`s (``__getitems__``)."""

    def __init__(
        self,
        source: MapSource,
        processor: SampleProcessor,
        tokenizer: Any,
        seed: int,
        keep_captions: bool,
        with_labels: bool | None,
    ):
        self.source = source
        self.processor = processor
        self.tokenizer = tokenizer
        self.seed = seed
        self.keep_captions = keep_captions
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, request: _Request) -> _Chunk:
        samples: list[ProcessedSample] = []
        budget = request.max_num_patches
        for index in request.indices:
            rng = sample_rng(self.seed, request.epoch, index, 0)
            item = self.processor(self.source.get(index), rng, budget)
            if item is not None:
                samples.append(item)
        skipped = self.processor.skips.take()
        if not samples:
            return _Chunk(request.chunk, None, skipped)
        pad_to = budget or self.processor.pad_to
        return _Chunk(
            request.chunk,
            collate(samples, self.tokenizer, None, self.keep_captions, self.with_labels, pad_to),
            skipped,
        )

    def __getitem__(self, request: _Request) -> _Chunk:
        return self.__getitems__(request)


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of ``n`` samples in ``epoch``: a permutation seeded by (seed, epoch), or ``arange``."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, "permutation") % (2**63))
    return torch.randperm(n, generator=g)


class MapLoader(ResumableLoader):
    """Training loader over a map-style source, split by rank, exactly-once, resumable (see the module
    docstring).

    Args:
        source: the data.
        processor: builds training samples (one caption each).
        tokenizer: caption tokenizer (runs in the workers).
        batch_size: samples per batch on this rank.
        rank: this process's rank.
        world_size: number of processes.
        seed: base seed of the permutation and of per-sample randomness.
        shuffle: permute the data every epoch.
        num_workers, pin_memory, prefetch_factor: as for ``torch.utils.data.DataLoader``.
        keep_captions: keep caption strings in the batches.
        with_labels: attach labels (``None``: when the samples have them).
        skip_stats: see :class:`ResumableLoader`.
    """

    def __init__(
        self,
        source: MapSource,
        processor: SampleProcessor,
        tokenizer: Any,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        keep_captions: bool = True,
        with_labels: bool | None = None,
        skip_stats: SkipStats | None = None,
    ):
        n = len(source)
        if n < world_size * batch_size:
            raise ValueError(
                f"the training data has {n} samples, fewer than world_size * batch_size = "
                f"{world_size} * {batch_size}; lower batch_size or add data"
            )
        num_batches = math.ceil(math.ceil(n / world_size) / batch_size)
        super().__init__(num_batches, batch_size, num_workers, pin_memory, prefetch_factor, skip_stats)
        self.source = source
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.processor, self.tokenizer = processor, tokenizer
        self.keep_captions, self.with_labels = keep_captions, with_labels
        self.dataset = _MapTrainDataset(source, processor, tokenizer, seed, keep_captions, with_labels)
        self._cursor = (0, 0)  # (chunk, usable samples of it already in batches) of the next sample

    def _fingerprint(self) -> dict[str, Any]:
        # seq_lens / token_budget: BudgetMapLoader's plan (None here), so neither resumes the other's epoch
        return {**super()._fingerprint(), "world_size": self.world_size, "num_samples": len(self.source),
                "seq_lens": None, "token_budget": None}

    def _extra_state(self) -> dict[str, Any]:
        return {"cursor": list(self._cursor)}

    def _begin_epoch(self, resume: dict[str, Any] | None) -> None:
        self._cursor = tuple(resume["cursor"]) if resume is not None and "cursor" in resume else (0, 0)

    def _requests(self, epoch: int, first: int) -> list[_Request]:
        order = epoch_permutation(len(self.source), self.seed, epoch, self.shuffle)
        mine = order[self.rank :: self.world_size].tolist()
        b = self.batch_size
        return [_Request(epoch, c, mine[c * b : (c + 1) * b]) for c in range(first, math.ceil(len(mine) / b))]

    def _empty(self, skipped: dict[str, int]) -> ImageTextBatch:
        images = self.processor.transform.empty_images()
        return empty_batch(images, self.tokenizer.context_length, skipped, self.keep_captions, self.with_labels)

    def _epoch_batches(self, epoch: int, consumed: int) -> Iterator[Any]:
        first, used = self._cursor
        requests = self._requests(epoch, first)
        end = first + len(requests)
        chunks = iter(self._dataloader(self.dataset, batch_sampler=requests)) if requests else iter(())
        current: _Chunk | None = None
        offset = 0
        resumed = True
        while True:
            parts: list[ImageTextBatch] = []
            skipped: Counter[str] = Counter()
            n, exhausted = 0, False
            while n < self.batch_size:
                if current is None or current.batch is None or offset >= len(current.batch):
                    nxt = next(chunks, None)
                    if nxt is None:
                        exhausted, current, offset = True, None, 0
                        break
                    current, offset = nxt, 0
                    if resumed and used:  # the chunk the checkpoint stopped in: its skips were counted
                        current.skipped, offset = {}, used
                    resumed = False
                    skipped.update(current.skipped)
                    self.skip_stats.check(skipped)  # the ceiling, on skipped work as it happens
                    continue
                take = min(self.batch_size - n, len(current.batch) - offset)
                parts.append(slice_batch(current.batch, offset, offset + take))
                offset, n = offset + take, n + take
            if current is not None and current.batch is not None and offset < len(current.batch):
                cursor = (current.chunk, offset)
            else:
                cursor = (current.chunk + 1 if current is not None else end, 0)
            batch = concat_batches(parts, dict(skipped)) if parts else self._empty(dict(skipped))
            yield cursor, batch, exhausted

    def _on_batch(self, item: Any) -> ImageTextBatch:
        self._cursor, batch, exhausted = item
        self._exhausted = self._exhausted or exhausted
        return batch


class BudgetMapLoader(MapLoader):
    """NaFlex training batches under a patch budget: variable images per batch (see :class:`MapLoader`).

    Batch ``c`` of every epoch draws a patch budget per image, ``seq_len``, from ``seq_lens`` (seeded by
    (seed, c), the same plan every epoch) and holds ``token_budget // seq_len`` images, each resized to at most
    ``seq_len`` patches and padded to it: every batch holds at most ``token_budget`` patches (the image tower's
    work per step is about constant; the text tower and the loss grow with the images), and the model sees
    every resolution, as SigLIP 2's NaFlex training does. Batches are the planned chunks of the epoch's order themselves: a skipped sample makes its
    batch one shorter instead of being replaced from the next. The epoch has as many batches as the plan
    needs to cover the largest rank's share; a rank whose share is used up yields empty batches.

    Args:
        source, processor, tokenizer, rank, world_size, seed, shuffle, ...: as :class:`MapLoader`
            (``processor`` must prepare NaFlex samples).
        seq_lens: the patch budgets per image a batch may draw.
        token_budget: patches per batch (``batch_size`` is ignored: it is ``token_budget // max(seq_lens)``).
    """

    def __init__(self, source: MapSource, *, seq_lens: list[int], token_budget: int, **kwargs: Any):
        if not seq_lens or min(seq_lens) < 1 or token_budget < max(seq_lens):
            raise ValueError(
                f"token_budget ({token_budget}) must hold one image of the largest of seq_lens {seq_lens}: "
                "lower the largest seq_len or raise the budget (the data module's batch_size)"
            )
        if not hasattr(kwargs["processor"].transform, "max_num_patches"):
            raise TypeError("BudgetMapLoader batches NaFlex images: give it a NaFlex tower's processor")
        kwargs["batch_size"] = token_budget // max(seq_lens)
        super().__init__(source, **kwargs)
        self.seq_lens, self.token_budget = [int(n) for n in seq_lens], int(token_budget)
        share = math.ceil(len(source) / self.world_size)
        self.plan: list[tuple[int, int]] = []  # (seq_len, images) of every batch of an epoch
        covered = 0
        while covered < share:
            seq_len = self.seq_lens[sample_seed(self.seed, "naflex_seq_len", len(self.plan)) % len(self.seq_lens)]
            self.plan.append((seq_len, self.token_budget // seq_len))
            covered += self.plan[-1][1]
        self.num_batches = len(self.plan)

    def _fingerprint(self) -> dict[str, Any]:
        return {**super()._fingerprint(), "seq_lens": self.seq_lens, "token_budget": self.token_budget}

    def _requests(self, epoch: int, first: int) -> list[_Request]:
        order = epoch_permutation(len(self.source), self.seed, epoch, self.shuffle)
        mine = order[self.rank :: self.world_size].tolist()
        requests, start = [], 0
        for c, (seq_len, n) in enumerate(self.plan):
            if c >= first and start < len(mine):
                requests.append(_Request(epoch, c, mine[start : start + n], seq_len))
            start += n
        return requests

    def _epoch_batches(self, epoch: int, consumed: int) -> Iterator[Any]:
        first = self._cursor[0]
        requests = self._requests(epoch, first)
        last = requests[-1].chunk if requests else -1
        chunks = iter(self._dataloader(self.dataset, batch_sampler=requests)) if requests else iter(())
        for chunk in chunks:
            seq_len = self.plan[chunk.chunk][0]
            batch = chunk.batch if chunk.batch is not None else self._empty({}, seq_len)
            batch.skipped = dict(chunk.skipped)
            yield (chunk.chunk + 1, 0), batch, chunk.chunk == last
        for c in range(max(first, last + 1), self.num_batches):  # this rank's share is used up
            yield (c + 1, 0), self._empty({}, self.plan[c][0]), True

    def _empty(self, skipped: dict[str, int], seq_len: int | None = None) -> ImageTextBatch:
        images = self.processor.transform.empty_images(seq_len)
        return empty_batch(images, self.tokenizer.context_length, skipped, self.keep_captions, self.with_labels)


class MapEvalDataset(Dataset):
    """Evaluation batches of a map-style source: ``__getitems__(indices)`` builds one batch in a worker.

    Use it with a ``batch_sampler`` of index lists (e.g. this rank's share cut into batches). Every caption
    of every image is kept; unusable samples are dropped, and a batch whose samples were all unusable comes
    out empty (zero rows) so that its skip counts still arrive.
    """

    def __init__(
        self, source: MapSource, processor: SampleProcessor, tokenizer: Any, keep_captions: bool, labels: bool
    ):
        self.source, self.processor, self.tokenizer = source, processor, tokenizer
        self.keep_captions, self.labels = keep_captions, labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices: list[int]) -> ImageTextBatch:
        samples = [self.processor(self.source.get(i)) for i in indices]
        kept = [s for s in samples if s is not None]
        skipped = self.processor.skips.take()
        if kept:
            return collate(kept, self.tokenizer, skipped, self.keep_captions, self.labels)
        # every sample of the batch was unusable: an empty batch keeps the count
        images, length = self.processor.transform.empty_images(), self.tokenizer.context_length
        return empty_batch(images, length, skipped, self.keep_captions, self.labels)
