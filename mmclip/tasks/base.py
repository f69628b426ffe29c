"""What every mmclip task shares, written once: optimizer and schedule from specs, skip counting, samples/s,
the random state for exact resume, EMA weights, and the fast defaults on CUDA GPUs."""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from mmclip.data.batch import ImageTextBatch
from mmclip.tasks.accelerate import cuda_defaults
from mmclip.tasks.optim import build_optimizer, build_scheduler
from mmclip.tasks.throughput import Throughput

__all__ = ["TrainingTask"]

log = logging.getLogger(__name__)


class TrainingTask(pl.LightningModule):
    """Base of the training tasks. Subclasses set ``optimizer_spec`` / ``scheduler_spec`` and may override
    :meth:`optimized_module` (what ``configure_optimizers`` builds parameter groups from)."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer_spec: dict[str, Any] = {}
        self.scheduler_spec: dict[str, Any] = {}
        self._throughput = Throughput()
        self._rng_base: int | None = None  # see on_train_batch_start
        self.ema: nn.Module | None = None

    # ---- EMA weights ---------------------------------------------------------------------------------
    def configure_ema(self, ema: dict[str, Any] | None) -> None:
        """Keeps an exponential moving average of :meth:`optimized_module`'s weights (and buffers), updated
        after every optimizer step, saved and restored with the task's state (``ema.*`` keys) and used by
        :attr:`eval_model`. Call it in ``__init__`` after the model is built, before anything compiles it.

        Args:
            ema: None (off) or ``{"decay": 0.9999}``: ``ema = decay * ema + (1 - decay) * weights``; the first
                update copies the weights (torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``).
        """
        if not ema:
            return
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        spec = dict(ema)
        decay = float(spec.pop("decay", 0.9999))
        if spec:
            raise ValueError(f"unknown ema settings {sorted(spec)}; known: ['decay']")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.ema = AveragedModel(
            self.optimized_module(), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )
        self.ema.requires_grad_(False)

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation uses: the EMA's when the task keeps one, else the trained model's."""
        return self.ema.module if self.ema is not None else self.optimized_module()

    def update_ema(self) -> None:
        """One EMA step toward the current weights (called after every optimizer step)."""
        if self.ema is not None:
            self.ema.update_parameters(self.optimized_module())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    # ---- set-up --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """On CUDA GPUs: TF32 for fp32 matmuls and channels-last convolutional towers (see
        :func:`mmclip.tasks.accelerate.cuda_defaults`)."""
        trainer = self._trainer
        if trainer is not None and trainer.strategy.root_device.type == "cuda":
            done = cuda_defaults(self)
            if done:
                log.info("CUDA defaults: %s", ", ".join(done))

    # ---- optimisation ------------------------------------------------------------------------------
    def optimized_module(self) -> nn.Module:
        """The module whose trainable parameters the optimizer holds (by default ``self.model``)."""
        return self.model

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.optimized_module(), **self.optimizer_spec)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            total = self.trainer.max_steps
        scheduler = build_scheduler(optimizer, total_steps=max(1, int(total)), **self.scheduler_spec)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- logging -----------------------------------------------------------------------------------
    def count_skips(self, batch: ImageTextBatch) -> None:
        """Checks the data module's skip ceiling and logs its counts: ``data/skipped``, ``data/skip_fraction``
        and ``data/skipped/<reason>`` (the training loaders count every batch they yield; a data module
        without such a loader has its counts added here)."""
        stats = getattr(getattr(self._trainer, "datamodule", None), "skip_stats", None)
        if stats is None:
            return
        stats.update(batch.skipped, len(batch))  # raises when the skipped fraction passes its ceiling
        self.log_dict(stats.as_dict(), on_step=True, reduce_fx="max")

    def skip_update(self) -> torch.Tensor | None:
        """Skips this step's parameter update on every rank (call it when every rank decided the same way,
        e.g. no pair on any process): None in one process; with several, a zero loss so the gradient
        reduction still meets, and :meth:`on_before_optimizer_step` drops the gradients, so the optimizer
        leaves the weights and its state alone, as in one process."""
        self._skip_update = True
        return self.empty_batch_step()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if getattr(self, "_skip_update", False):
            self._skip_update = False
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def empty_batch_step(self) -> torch.Tensor | None:
        """What ``training_step`` returns for a batch without samples (an exactly-once epoch's last batches
        may be short or empty on some ranks): None, skipping the step, in one process; with several, a zero
        loss joined to every trainable parameter, so the ranks' gradient reduction still meets."""
        if self.trainer.world_size == 1:
            return None
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.reshape(-1)[:1].sum() for p in params]).sum() * 0.0

    def log_lr(self, batch_size: int) -> None:
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)

    def on_train_batch_end(self, outputs: Any, batch: ImageTextBatch, batch_idx: int) -> None:
        rate = self._throughput.update(len(batch) * self.trainer.world_size)  # over windows of >= 5 s
        if rate is not None:
            self.log("train/samples_per_sec", rate, rank_zero_only=True)

    # ---- exact resume: the random state (dropout, patch dropout) -------------------------------------
    # Each training batch draws from the global generators seeded by (base seed, epoch, batch, step, rank):
    # what ran between two steps (DataLoader iterators drawing their base seed, validation, callbacks) can
    # no longer shift a step's dropout masks, so a resumed run repeats the uninterrupted one bit for bit.
    # The base seed is the global seed at the first fit (``seed_everything``) and travels in the checkpoint,
    # with the global state itself (what draws between steps, e.g. an epoch's new iterator, stays in step).
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_base is None:  # the first batch of a fresh fit
            self._rng_base = int(torch.initial_seed())
        rank = self.trainer.global_rank if self._trainer is not None else 0
        torch.manual_seed(_step_seed(self._rng_base, self.current_epoch, batch_idx, self.global_step, rank))

    def _match_one_element_shapes(self, state: dict[str, Any] | None) -> None:
        """A checkpoint of an FSDP run ((1,) scalars) loads into a plain task and a plain one into an FSDP task
        (whose own names FSDP has changed, hence the lifted names it recorded)."""
        from mmclip.models.convert.checkpoint import match_one_element_shapes

        lifted = getattr(self, "_lifted_parameters", ())
        own = {k: torch.Size([1]) for k in lifted} if lifted else {n: p.shape for n, p in self.named_parameters()}
        match_one_element_shapes(state or {}, own)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "base": self._rng_base}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["mmclip_rng"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._match_one_element_shapes(checkpoint.get("state_dict"))
        state = checkpoint.get("mmclip_rng")
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state.get("base") is not None:
            self._rng_base = int(state["base"])
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _step_seed(*parts: int) -> int:
    """A 63-bit seed from ``parts``, the same in every process (blake2b, not Python's salted ``hash``)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1
