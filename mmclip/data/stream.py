"""Resumable, rank- and worker-split, exactly-once loading for streamed sources (webdataset shards,
streaming HF).

A :class:`StreamSource` is a list of shards that can each be read front to back. Every DataLoader worker of
every rank is a *slot* (``rank * workers + worker`` of ``world_size * workers``) that reads its own part,
once per epoch (a training epoch is one pass over the shards; nothing is read twice):

* not resampled, at least as many shards as slots: the shards are dealt into one group per slot, balanced
  by sample count when the shard sizes are known (largest first, to the group with the fewest samples),
  else every ``G``-th shard. Each epoch the groups are handed to the slots in an order seeded by
  (seed, epoch) and each slot reads its group's shards in a seeded order;
* not resampled, fewer shards than slots: every slot reads all shards and keeps every ``G``-th sample;
* resampled: each slot draws shards with replacement (sources picked by weight), seeded by
  (seed, epoch, slot), an endless stream; the declared epoch length decides how much of it is an epoch.

Within a slot, a shuffle buffer (seeded by (seed, epoch, slot)) mixes samples of nearby shards. Every
worker builds the same number ``q`` of training batches per epoch from its own stream, in order; a skipped
sample is gone for the epoch and the next samples fill its place. When the shard sizes are known and no
epoch length is declared, ``q = ceil(largest group / batch_size)``, so every usable sample is yielded
exactly once per epoch: a worker whose stream ends first yields its last samples as a short batch and then
empty batches (zero rows, carrying skip counts) up to ``q``, so that every rank yields the same number of
batches. With a declared ``epoch_length`` a worker stops after its share of it (samples beyond are not seen
that epoch) or pads when its stream ends first. A worker that reads ``min_samples`` samples without a usable
one, and a rank whose whole pass yields none, raise :class:`DataQualityError` (bounded work, never a hang).

Batches are dealt to the workers round-robin (worker ``w`` of ``W`` builds batches ``w, w + W, ...``),
which is the order in which the DataLoader returns them. Resuming: every batch tells the main process how
far its slot has read (samples taken from the shuffle buffer). After ``k`` consumed batches, worker ``w``
has built ``k // W + (w < k % W)`` of them; a resumed loader reads each slot's stream again without decoding
up to that point (same shard order, same buffer) and rotates the workers so that the DataLoader's
round-robin continues with worker ``k % W``. Per-sample randomness is seeded from (seed, epoch, slot,
position), so resumed batches equal the uninterrupted ones.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from torch.utils.data import IterableDataset, get_worker_info

from mmclip.data.batch import ImageTextBatch
from mmclip.data.collate import RawSample, SampleProcessor, collate, empty_batch, sample_rng, sample_seed
from mmclip.data.loader import ResumableLoader
from mmclip.data.quality import SkipStats

__all__ = ["StreamDataset", "StreamLoader", "StreamSource", "balanced_groups", "shuffled"]

logger = logging.getLogger(__name__)

_MAX_EMPTY_DRAWS = 1000


class StreamSource(Protocol):
    """Shards that can each be read front to back.

    ``shards`` lists them; ``source_of[i]`` is the weighted source shard ``i`` belongs to (all 0 for one
    source); ``iter_shard(i, skips)`` yields the shard's raw samples (reporting unreadable shard tails to
    ``skips``); ``num_samples()`` is the total sample count if known, else ``None``; an optional
    ``shard_sizes()`` gives each shard's sample count (``None`` entries where unknown).
    """

    shards: Sequence[Any]
    source_of: Sequence[int]

    def iter_shard(self, index: int, skips: Any) -> Iterator[RawSample]: ...

    def num_samples(self) -> int | None: ...


def _shard_sizes(source: StreamSource) -> list[int] | None:
    """Every shard's sample count, or ``None`` if any is unknown."""
    sizes = source.shard_sizes() if hasattr(source, "shard_sizes") else None
    if sizes is None or any(n is None for n in sizes):
        return None
    return [int(n) for n in sizes]


def balanced_groups(sizes: Sequence[int], groups: int) -> list[list[int]]:
    """Shard indices dealt into ``groups`` groups of near-equal sample counts (largest shard first, to the
    group with the fewest samples, ties to the lowest group): equal sizes give every ``groups``-th shard."""
    out: list[list[int]] = [[] for _ in range(groups)]
    totals = [0] * groups
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        g = min(range(groups), key=lambda g: (totals[g], g))
        out[g].append(i)
        totals[g] += sizes[i]
    return [sorted(g) for g in out]


def slot_supply(sizes: Sequence[int], slots: int) -> int:
    """The most samples one slot reads in a pass (see the module docstring)."""
    total = sum(sizes)
    if len(sizes) < slots:
        return -(-total // slots)
    return max(sum(sizes[i] for i in g) for g in balanced_groups(sizes, slots))


def shuffled(samples: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of ``bufsize`` items: fill it, then emit a random item per new one."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for item in samples:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class StreamDataset(IterableDataset):
    """One epoch of batches from a :class:`StreamSource` for one rank (see the module docstring).

    In training mode it yields ``(worker, position, batch)``: the logical worker, how many samples that
    worker's stream has given so far, and the batch. In evaluation mode it yields batches of every sample
    of the rank's share, the last one of each worker short.

    Args:
        source: the shards.
        processor: sample processor (training: one caption per image; evaluation: all).
        tokenizer: caption tokenizer.
        batch_size: samples per batch.
        train: training mode (shuffle, wrap-around, per-worker quotas, resume) or evaluation mode.
        epoch: the epoch (shard order, buffers and per-sample randomness depend on it).
        rank, world_size: this process's share.
        workers: DataLoader workers (0 counts as 1).
        quotas: training batches each logical worker builds.
        offsets: per logical worker, stream positions already consumed (resume).
        done: per logical worker, batches already consumed (resume).
        rotation: physical worker ``p`` plays logical worker ``(p + rotation) % workers``.
        seed: base seed.
        shuffle_buffer: samples in each worker's shuffle buffer (training).
        resampled: draw shards with replacement, by source weight.
        weights: per-source weights (resampled mode).
        label_filter: keep only samples with a label >= 0 (classification).
        keep_captions, with_labels: as for :func:`mmclip.data.collate.collate`.
        skip_stats: the ceiling settings (``min_samples``: a worker that reads this many samples without a
            usable one raises :class:`DataQualityError`).
    """

    def __init__(
        self,
        source: StreamSource,
        processor: SampleProcessor,
        tokenizer: Any,
        batch_size: int,
        train: bool,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        quotas: Sequence[int] | None = None,
        offsets: Sequence[int] | None = None,
        done: Sequence[int] | None = None,
        rotation: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 0,
        resampled: bool = False,
        weights: Sequence[float] | None = None,
        label_filter: bool = False,
        keep_captions: bool = True,
        with_labels: bool | None = None,
        skip_stats: SkipStats | None = None,
    ):
        self.source = source
        self.processor = processor
        self.skip_stats = skip_stats if skip_stats is not None else SkipStats()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.train = train
        self.epoch = epoch
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, workers)
        self.quotas = list(quotas) if quotas is not None else None
        self.offsets = list(offsets) if offsets is not None else [0] * self.workers
        self.done = list(done) if done is not None else [0] * self.workers
        self.rotation = rotation
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.weights = list(weights) if weights is not None else None
        self.label_filter = label_filter
        self.keep_captions = keep_captions
        self.with_labels = with_labels

    def _shard_pass(self, slot: int, slots: int) -> Iterator[RawSample]:
        shards = list(range(len(self.source.shards)))
        skips = self.processor.skips
        if not self.train:  # evaluation: shard order as listed
            if len(shards) >= slots:
                for i in shards[slot::slots]:
                    yield from self.source.iter_shard(i, skips)
                return
        elif len(shards) >= slots:
            sizes = _shard_sizes(self.source)
            groups = (
                balanced_groups(sizes, slots)
                if sizes is not None
                else [shards[g::slots] for g in range(slots)]
            )
            rng = random.Random(sample_seed(self.seed, self.epoch, "shards"))
            owner = list(range(slots))
            rng.shuffle(owner)  # which group each slot reads this epoch
            mine = list(groups[owner[slot]])
            random.Random(sample_seed(self.seed, self.epoch, "shards", slot)).shuffle(mine)
            for i in mine:
                yield from self.source.iter_shard(i, skips)
            return
        else:
            random.Random(sample_seed(self.seed, self.epoch, "shards")).shuffle(shards)
        n = 0  # fewer shards than slots: every slot reads everything and keeps every slots-th sample
        for i in shards:
            for sample in self.source.iter_shard(i, skips):
                if n % slots == slot:
                    yield sample
                n += 1

    def _raw(self, slot: int, slots: int) -> Iterator[RawSample]:
        if self.resampled:
            yield from self._resampled(slot)
            return
        samples = self._shard_pass(slot, slots)
        if self.train and self.shuffle_buffer > 1:
            buffer_rng = random.Random(sample_seed(self.seed, self.epoch, "buffer", slot, 0))
            samples = shuffled(samples, self.shuffle_buffer, buffer_rng)
        yield from samples

    def _resampled(self, slot: int) -> Iterator[RawSample]:
        rng = random.Random(sample_seed(self.seed, self.epoch, "resample", slot))
        by_source: dict[int, list[int]] = {}
        for i, s in enumerate(self.source.source_of):
            by_source.setdefault(s, []).append(i)
        sources = sorted(by_source)
        weights = [self.weights[s] if self.weights else 1.0 for s in sources]
        empty = 0
        while True:
            src = rng.choices(sources, weights)[0]
            got = False
            for sample in self.source.iter_shard(rng.choice(by_source[src]), self.processor.skips):
                got = True
                yield sample
            empty = 0 if got else empty + 1
            if empty >= _MAX_EMPTY_DRAWS:
                raise RuntimeError(f"{_MAX_EMPTY_DRAWS} shards in a row had no samples; check the shard list")

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(
                f"StreamDataset was planned for {self.workers} workers, runs with {info.num_workers}"
            )
        worker = (physical + self.rotation) % self.workers
        slot = self.rank * self.workers + worker
        slots = self.world_size * self.workers
        stream = self._raw(slot, slots)
        if self.resampled and self.shuffle_buffer > 1:
            stream = shuffled(
                stream, self.shuffle_buffer, random.Random(sample_seed(self.seed, self.epoch, "buffer", slot))
            )
        if self.train:
            yield from self._train_batches(stream, worker, slot)
        else:
            yield from self._eval_batches(stream)

    def _empty(self, skipped: dict[str, int]) -> ImageTextBatch:
        length = self.tokenizer.context_length
        images = self.processor.transform.empty_images()
        return empty_batch(images, length, skipped, self.keep_captions, self.with_labels)

    def _batch(self, items: list[Any]) -> ImageTextBatch:
        return collate(
            items, self.tokenizer, self.processor.skips.take(), self.keep_captions, self.with_labels,
            self.processor.pad_to,
        )

    def _train_batches(self, stream: Iterator[RawSample], worker: int, slot: int) -> Iterator[Any]:
        assert self.quotas is not None
        position, built, quota = self.offsets[worker], self.done[worker], self.quotas[worker]
        if built >= quota:
            return
        for _ in range(position):  # resume: replay the consumed part of the stream without decoding it
            next(stream, None)
        self.processor.skips.take()  # skips seen while replaying were counted before the checkpoint
        batch: list[Any] = []
        read = usable = 0
        for raw in stream:
            position += 1
            read += 1
            item = self.processor(raw, sample_rng(self.seed, self.epoch, slot, position - 1))
            if item is None:
                if usable == 0 and read >= self.skip_stats.min_samples:
                    where = f"the first {read} samples of worker slot {slot} (epoch {self.epoch})"
                    raise self.skip_stats.nothing_usable(where, self.processor.skips.pending)
                continue
            usable += 1
            batch.append(item)
            if len(batch) == self.batch_size:
                yield worker, position, self._batch(batch), False
                built, batch = built + 1, []
                if built >= quota:
                    return
        # the slot's pass is over: its last samples as a short batch, then empty ones up to the quota
        if batch:
            yield worker, position, self._batch(batch), True
            built += 1
        while built < quota:
            yield worker, position, self._empty(self.processor.skips.take()), True
            built += 1

    def _eval_batches(self, stream: Iterator[RawSample]) -> Iterator[ImageTextBatch]:
        batch: list[Any] = []
        for raw in stream:
            if self.label_filter and (raw.label is None or raw.label < 0):
                continue
            item = self.processor(raw)
            if item is not None:
                batch.append(item)
            if len(batch) == self.batch_size:
                yield collate(
                    batch, self.tokenizer, self.processor.skips.take(), self.keep_captions, self.with_labels
                )
                batch = []
        if batch:
            yield collate(
                batch, self.tokenizer, self.processor.skips.take(), self.keep_captions, self.with_labels
            )


class StreamLoader(ResumableLoader):
    """Training loader over a :class:`StreamSource`, exactly-once, resumable (see the module docstring).

    Args:
        source: the shards.
        processor: training sample processor.
        tokenizer: caption tokenizer.
        batch_size: samples per batch on this rank.
        num_batches: batches per epoch on this rank (a declared epoch length); ``None``: one pass over
            the shards, planned from their sizes (which must be known).
        rank, world_size: this process's share.
        seed: base seed.
        shuffle_buffer: samples per worker shuffle buffer.
        resampled: draw shards with replacement.
        weights: per-source weights (resampled mode).
        num_workers, pin_memory, prefetch_factor: as for ``torch.utils.data.DataLoader``.
        keep_captions, with_labels: as for :func:`mmclip.data.collate.collate`.
        skip_stats: see :class:`mmclip.data.loader.ResumableLoader`.
    """

    def __init__(
        self,
        source: StreamSource,
        processor: SampleProcessor,
        tokenizer: Any,
        batch_size: int,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        weights: Sequence[float] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        keep_captions: bool = True,
        with_labels: bool | None = None,
        skip_stats: SkipStats | None = None,
    ):
        self.logical_workers = max(1, num_workers)
        w = self.logical_workers
        if num_batches is None:
            sizes = _shard_sizes(source)
            if sizes is None or resampled:
                raise ValueError(
                    "the number of training samples is unknown (for shards: no sizes.json next to them and "
                    "they are not local files), or the shards are resampled; pass epoch_length=<samples per epoch>"
                )
            per_worker = -(-slot_supply(sizes, world_size * w) // batch_size)
            quotas = [per_worker] * w
            num_batches = per_worker * w
        else:
            quotas = [num_batches // w + (i < num_batches % w) for i in range(w)]
        if num_batches <= 0:
            raise ValueError(
                f"the training epoch has {num_batches} batches per rank; declare a larger epoch_length"
            )
        super().__init__(num_batches, batch_size, num_workers, pin_memory, prefetch_factor, skip_stats)
        self.quotas = quotas
        self._kwargs = dict(
            source=source,
            processor=processor,
            tokenizer=tokenizer,
            batch_size=batch_size,
            train=True,
            rank=rank,
            world_size=world_size,
            workers=num_workers,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
            weights=weights,
            keep_captions=keep_captions,
            with_labels=with_labels,
            skip_stats=self.skip_stats,
        )
        self.world_size = world_size
        self._offsets = [0] * w
        self._ended: set[int] = set()

    def _fingerprint(self) -> dict[str, Any]:
        return {
            **super()._fingerprint(),
            "world_size": self.world_size,
            "num_workers": self.logical_workers,
            "num_shards": len(self._kwargs["source"].shards),  # type: ignore[union-attr]
        }

    def _extra_state(self) -> dict[str, Any]:
        return {"offsets": list(self._offsets)}

    def _begin_epoch(self, resume: dict[str, Any] | None) -> None:
        self._offsets = list(resume["offsets"]) if resume is not None else [0] * self.logical_workers
        self._ended = set()

    def _done(self, consumed: int) -> list[int]:
        w = self.logical_workers
        return [consumed // w + (i < consumed % w) for i in range(w)]

    def _epoch_batches(self, epoch: int, consumed: int) -> Iterator[Any]:
        dataset = StreamDataset(
            epoch=epoch,
            quotas=self.quotas,
            offsets=self._offsets,
            done=self._done(consumed),
            rotation=consumed % self.logical_workers,
            **self._kwargs,
        )
        yield from self._dataloader(dataset, batch_size=None)

    def _on_batch(self, item: Any) -> ImageTextBatch:
        worker, position, batch, ended = item
        self._offsets[worker] = position
        if ended:
            self._ended.add(worker)
        self._exhausted = len(self._ended) == self.logical_workers
        return batch
