"""Resumable, rank-aware loading for map-style sources (synthetic scenes, HF datasets, CSV rows).

:class:`ResumableLoader` is what ``train_dataloader()`` returns. It has ``__len__`` (batches per epoch on
this rank) and ``state_dict()`` / ``load_state_dict()``, which Lightning calls when it checkpoints and
resumes: because the loader is sized, Lightning does not prefetch, so the number of batches the loader has
yielded when a checkpoint is written is the number the model consumed. The loader keeps its own epoch
counter: every ``iter()`` after the first starts the next epoch (the body runs at the first ``next()``, so
a bare ``iter()`` probe changes nothing), and an ``iter()`` after ``load_state_dict`` continues the saved
epoch where it stopped.

For map-style sources (:class:`MapLoader`) each epoch is a permutation of the data seeded by
(seed, epoch); rank ``r`` of ``R`` takes every ``R``-th index of it (the tail that does not fill a batch on
every rank is dropped), and batches are cut in the main process, so resuming is skipping the consumed
batches of the same permutation. Workers build whole batches (decode, transform, tokenize); a sample that
cannot be used is replaced by a random one drawn from (seed, epoch, batch, attempt), so every training batch
is full and the same on a resumed run. Per-sample randomness is seeded from (seed, epoch, index).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mmclip.data.batch import ImageTextBatch
from mmclip.data.collate import ProcessedSample, RawSample, SampleProcessor, collate, sample_rng, sample_seed
from mmclip.data.quality import DataQualityError

__all__ = ["MapEvalDataset", "MapLoader", "MapSource", "ResumableLoader", "epoch_permutation"]

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
    """

    def __init__(
        self,
        num_batches: int,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
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
        return {"epoch": self.epoch, "consumed": self._consumed, **self._fingerprint(), **self._extra_state()}

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
    """One training batch to build: its epoch, its index in the epoch, and its sample indices."""

    epoch: int
    batch: int
    indices: list[int]


class _MapTrainDataset(Dataset):
    """Builds whole training batches in the workers from :class:`_Request`s (``__getitems__``)."""

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

    def __getitems__(self, request: _Request) -> ImageTextBatch:
        samples: list[ProcessedSample] = []
        for index in request.indices:
            item = self.processor(self.source.get(index), sample_rng(self.seed, request.epoch, index, 0))
            if item is not None:
                samples.append(item)
        want, n = len(request.indices), len(self.source)
        attempt, max_attempts = 0, 4 * want + 16
        while len(samples) < want:
            if attempt >= max_attempts:
                raise DataQualityError(
                    f"could not fill a training batch of {want}: {attempt} replacement samples in a row were "
                    f"unusable as well (skips so far: {dict(self.processor.skips.pending)}); the data is broken"
                )
            index = sample_rng(self.seed, request.epoch, "replace", request.batch, attempt).randrange(n)
            attempt += 1
            item = self.processor(
                self.source.get(index), sample_rng(self.seed, request.epoch, index, attempt)
            )
            if item is not None:
                samples.append(item)
        return collate(
            samples, self.tokenizer, self.processor.skips.take(), self.keep_captions, self.with_labels
        )

    def __getitem__(self, request: _Request) -> ImageTextBatch:
        return self.__getitems__(request)


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of ``n`` samples in ``epoch``: a permutation seeded by (seed, epoch), or ``arange``."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, "permutation") % (2**63))
    return torch.randperm(n, generator=g)


class MapLoader(ResumableLoader):
    """Training loader over a map-style source, split by rank, resumable (see the module docstring).

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
    ):
        n = len(source)
        per_rank = n // world_size
        num_batches = per_rank // batch_size
        if num_batches == 0:
            raise ValueError(
                f"the training data has {n} samples, fewer than world_size * batch_size = "
                f"{world_size} * {batch_size}; lower batch_size or add data"
            )
        super().__init__(num_batches, batch_size, num_workers, pin_memory, prefetch_factor)
        self.source = source
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = per_rank
        self.dataset = _MapTrainDataset(source, processor, tokenizer, seed, keep_captions, with_labels)

    def _fingerprint(self) -> dict[str, Any]:
        return {**super()._fingerprint(), "world_size": self.world_size, "num_samples": len(self.source)}

    def _requests(self, epoch: int, consumed: int) -> Iterator[_Request]:
        order = epoch_permutation(len(self.source), self.seed, epoch, self.shuffle)
        mine = order[self.rank :: self.world_size][: self.per_rank].tolist()
        b = self.batch_size
        for i in range(consumed, self.num_batches):
            yield _Request(epoch, i, mine[i * b : (i + 1) * b])

    def _epoch_batches(self, epoch: int, consumed: int) -> Iterator[ImageTextBatch]:
        requests = list(self._requests(epoch, consumed))
        loader = self._dataloader(self.dataset, batch_sampler=requests)
        yield from loader


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
        h, w = self.processor.transform.size
        length = self.tokenizer.context_length
        return ImageTextBatch(  # every sample of the batch was unusable: an empty batch keeps the count
            images=torch.zeros(0, 3, h, w),
            input_ids=torch.zeros(0, length, dtype=torch.long),
            keys=[],
            labels=torch.zeros(0, dtype=torch.long) if self.labels else None,
            captions=[] if self.keep_captions else None,
            skipped=skipped,
        )
