"""A test callback recording the first training step's loss and gradients (rank 0 writes them)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class FirstStepProbe(pl.Callback):
    """Saves ``{"loss", "grads", "keys"}`` of the first optimizer step to ``path`` (after DDP's all-reduce)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loss: torch.Tensor | None = None
        self.keys: list[str] = []
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0 and outputs is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.loss = loss.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            keys = [None] * trainer.world_size
            if trainer.world_size > 1:
                torch.distributed.all_gather_object(keys, list(batch.keys))
            else:
                keys = [list(batch.keys)]
            self.keys = [k for rank_keys in keys for k in rank_keys]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.done:
            return
        self.done = True
        grads = {
            n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None
        }
        self._grads = grads

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save({"loss": self.loss, "grads": self._grads, "keys": self.keys}, self.path)
