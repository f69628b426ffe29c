"""Evaluation during ``fit``: zero-shot classification, retrieval recall@k and a linear probe.

Each callback runs every ``every_n_steps`` optimizer steps and/or every ``every_n_epochs`` epochs and/or
once at the end of ``fit``, on every process: each rank embeds its own shard
(``trainer.datamodule.retrieval_dataloader(split, rank, world_size)`` /
``classification_dataloader(...)``), the metrics sync across ranks and every rank gets the
single-process result. The model is ``pl_module.eval_model`` (a ``DualEncoder``: the EMA weights when the
task keeps them, else ``pl_module.model``), run under
``torch.no_grad()`` in eval mode (each submodule's train/eval flag is restored after), its towers under
the trainer's mixed-precision autocast (similarities, logits and the probe in full precision). Results are logged as ``{prefix}/{metric}`` (e.g.
``val/retrieval/t2i_R@1``) and kept in ``callback.last_results``. Epoch-end results go through
``pl_module.log_dict(on_epoch=True)``; step and fit-end results go straight to the trainer's loggers at
``trainer.global_step`` (``self.log`` there would repeat the value at every later step of the epoch, or
is not allowed) and into ``trainer.callback_metrics``, so ``ModelCheckpoint(monitor=...)`` sees them
either way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from mmclip.evaluation.core import default_class_subsets, run_linear_probe, run_retrieval, run_zeroshot
from mmclip.metrics.linear_probe import DEFAULT_L2_GRID
from mmclip.metrics.retrieval import DEFAULT_CHUNK_SIZE, DEFAULT_KS
from mmclip.metrics.zeroshot import Template

__all__ = ["LinearProbeEval", "RetrievalEval", "ZeroShotEval"]

log = logging.getLogger(__name__)


def _amp_dtype(trainer: pl.Trainer) -> torch.dtype | None:
    """The autocast dtype of the trainer's mixed precision ("bf16-mixed", "16-mixed"), else None.

    Only the towers run under it; similarities, logits and the probe are computed in fp32 / fp64. With
    "-true" precisions the weights themselves are low precision and images are cast to their dtype.
    """
    precision = str(getattr(trainer, "precision", ""))
    if precision.endswith("-mixed"):
        return torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return None


class _PeriodicEval(pl.Callback):
    """Schedules an evaluation and logs its results; subclasses implement :meth:`run`."""

    default_prefix = "val"

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        at_fit_end: bool = True,
        prefix: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.at_fit_end = at_fit_end
        self.prefix = self.default_prefix if prefix is None else prefix
        self.last_results: dict[str, float] = {}
        self._last_step: int | None = None
        self._warned = False

    # ---- what to evaluate (subclasses) ----------------------------------------------------------
    def run(
        self,
        model: torch.nn.Module,
        datamodule: Any,
        device: torch.device,
        shard: dict[str, int],
        amp_dtype: torch.dtype | None = None,
    ) -> dict[str, float] | None:
        """Evaluates ``model`` on this rank's shard (``shard = {"rank": r, "world_size": w}``, the
        keyword arguments of the data module's loaders), its towers under autocast to ``amp_dtype``
        (None: none); returns None when the data cannot support the task."""
        raise NotImplementedError

    # ---- scheduling -----------------------------------------------------------------------------
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        if self._last_step == trainer.global_step:
            return None  # already evaluated at this step (accumulation, or epoch end == fit end)
        self._last_step = trainer.global_step
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError(f"{type(self).__name__} needs trainer.fit(..., datamodule=...)")
        shard = {"rank": trainer.global_rank, "world_size": trainer.world_size}
        model = getattr(pl_module, "eval_model", pl_module.model)
        results = self.run(model, datamodule, pl_module.device, shard, _amp_dtype(trainer))
        if results is None:
            return None
        self.last_results = {f"{self.prefix}/{k}": float(v) for k, v in results.items()}
        return self.last_results

    def _log_now(self, trainer: pl.Trainer, results: dict[str, float]) -> None:
        """Logs at ``trainer.global_step`` straight to the loggers (rank zero) and exposes the values in
        ``trainer.callback_metrics``: used where ``pl_module.log`` would repeat a step value at every
        later step of the epoch (``on_train_batch_end``) or is not allowed (``on_fit_end``)."""
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in results.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(results, step=trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            results = self._evaluate(trainer, pl_module)
            if results:
                self._log_now(trainer, results)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            results = self._evaluate(trainer, pl_module)
            if results:
                pl_module.log_dict(results, on_step=False, on_epoch=True, sync_dist=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end:
            results = self._evaluate(trainer, pl_module)
            if results:
                self._log_now(trainer, results)
                if trainer.is_global_zero:
                    for logger in trainer.loggers:
                        logger.save()

    def _skip(self, why: str) -> None:
        if not self._warned:
            log.warning("%s: skipped, %s", type(self).__name__, why)
            self._warned = True


class RetrievalEval(_PeriodicEval):
    """Image<->text recall@k (any-positive and paired) on ``datamodule.retrieval_dataloader(split, ...)``.

    Args:
        split: the data module split.
        ks: the k of recall@k.
        chunk_size: image rows of the similarity matrix held at a time.
        paired: also log OpenCLIP's paired 1:1 metrics.
        every_n_steps: evaluate every that many optimizer steps (None: never).
        every_n_epochs: evaluate every that many epochs (None: never).
        at_fit_end: evaluate when ``fit`` ends (skipped if it just ran at the same step).
        prefix: log prefix (default ``val/retrieval``).
    """

    default_prefix = "val/retrieval"

    def __init__(
        self,
        split: str = "val",
        ks: Sequence[int] = DEFAULT_KS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        paired: bool = True,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        at_fit_end: bool = True,
        prefix: str | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs, at_fit_end, prefix)
        self.split = split
        self.ks = tuple(ks)
        self.chunk_size = chunk_size
        self.paired = paired

    def run(
        self,
        model: torch.nn.Module,
        datamodule: Any,
        device: torch.device,
        shard: dict[str, int],
        amp_dtype: torch.dtype | None = None,
    ) -> dict[str, float] | None:
        loader = datamodule.retrieval_dataloader(split=self.split, **shard)
        if loader is None:
            self._skip(f"the data module has no {self.split!r} split")
            return None
        return run_retrieval(
            model,
            loader,
            device,
            ks=self.ks,
            chunk_size=self.chunk_size,
            paired=self.paired,
            amp_dtype=amp_dtype,
        )


class ZeroShotEval(_PeriodicEval):
    """Zero-shot top-1 / top-5 / mean per-class recall on ``datamodule.classification_dataloader(split, ...)``.

    Class names, templates and tokenizer come from the data module (``classnames``, ``templates`` (None:
    mmclip's default set), ``tokenizer``) unless given here.

    Args:
        split: the data module split.
        classnames: override ``datamodule.classnames``.
        templates: override ``datamodule.templates`` (placeholder ``{}``; see ``mmclip.metrics.zeroshot``).
        class_subsets: ``{name: classes}`` also scored alone; None: ``{"held_out": datamodule.held_out_classes}``
            when the data module has them.
        topk: the k of top-k accuracy.
        every_n_steps / every_n_epochs / at_fit_end / prefix: see :class:`RetrievalEval`
            (default prefix ``val/zeroshot``).
    """

    default_prefix = "val/zeroshot"

    def __init__(
        self,
        split: str = "test",
        classnames: Sequence[str] | None = None,
        templates: Sequence[Template] | Mapping[str, Sequence[Template]] | None = None,
        class_subsets: Mapping[str, Sequence[int | str]] | None = None,
        topk: Sequence[int] = (1, 5),
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        at_fit_end: bool = True,
        prefix: str | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs, at_fit_end, prefix)
        self.split = split
        self.classnames = None if classnames is None else list(classnames)
        self.templates = templates
        self.class_subsets = class_subsets
        self.topk = tuple(topk)

    def run(
        self,
        model: torch.nn.Module,
        datamodule: Any,
        device: torch.device,
        shard: dict[str, int],
        amp_dtype: torch.dtype | None = None,
    ) -> dict[str, float] | None:
        names = self.classnames if self.classnames is not None else getattr(datamodule, "classnames", None)
        loader = datamodule.classification_dataloader(split=self.split, **shard)
        if loader is None or not names:
            self._skip("the data module has no labels or no class names")
            return None
        templates = self.templates if self.templates is not None else getattr(datamodule, "templates", None)
        return run_zeroshot(
            model,
            datamodule.tokenizer,
            loader,
            names,
            templates,
            device,
            topk=self.topk,
            class_subsets=default_class_subsets(datamodule)
            if self.class_subsets is None
            else self.class_subsets,
            amp_dtype=amp_dtype,
        )


class LinearProbeEval(_PeriodicEval):
    """Logistic-regression probe on frozen image embeddings; logs test ``accuracy``, chosen ``l2``, ``val_accuracy``.

    Args:
        train_split: data module split the probe is fitted on.
        val_split: split for the L2 sweep; None (or a split without a loader) carves ``val_fraction`` of
            the training split.
        test_split: split the accuracy is reported on.
        l2_grid: L2 strengths swept.
        val_fraction: fraction of train carved for validation when needed.
        max_iter: L-BFGS iterations per fit.
        every_n_steps / every_n_epochs / at_fit_end / prefix: see :class:`RetrievalEval` (defaults: only at
            fit end; prefix ``val/linear_probe``).
    """

    default_prefix = "val/linear_probe"

    def __init__(
        self,
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str = "test",
        l2_grid: Sequence[float] = DEFAULT_L2_GRID,
        val_fraction: float = 0.2,
        max_iter: int = 500,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_fit_end: bool = True,
        prefix: str | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs, at_fit_end, prefix)
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.l2_grid = tuple(l2_grid)
        self.val_fraction = val_fraction
        self.max_iter = max_iter

    def run(
        self,
        model: torch.nn.Module,
        datamodule: Any,
        device: torch.device,
        shard: dict[str, int],
        amp_dtype: torch.dtype | None = None,
    ) -> dict[str, float] | None:
        train = datamodule.classification_dataloader(split=self.train_split, **shard)
        test = datamodule.classification_dataloader(split=self.test_split, **shard)
        if train is None or test is None:
            self._skip("the data module has no labels")
            return None
        val = datamodule.classification_dataloader(split=self.val_split, **shard) if self.val_split else None
        names = getattr(datamodule, "classnames", None)
        return run_linear_probe(
            model,
            train,
            test,
            val,
            device,
            num_classes=len(names) if names else None,
            l2_grid=self.l2_grid,
            val_fraction=self.val_fraction,
            max_iter=self.max_iter,
            amp_dtype=amp_dtype,
        )
