"""ContrastiveTask: trains any DualEncoder with a CLIP or SigLIP loss under Lightning."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch

from mmclip.data.batch import ImageTextBatch
from mmclip.losses.accumulation import cached_feature_step
from mmclip.models.dual_encoder import DualEncoder
from mmclip.models.factory import _merge, get_model_config
from mmclip.registry import LOSSES
from mmclip.tasks.optim import build_optimizer, build_scheduler
from mmclip.tasks.throughput import Throughput
from mmclip.tokenizers import get_tokenizer

__all__ = ["ContrastiveTask", "build_model_config"]

log = logging.getLogger(__name__)


def build_model_config(
    model: str | None = None,
    image_tower: dict[str, Any] | None = None,
    text_tower: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """The DualEncoder config from a named model and/or tower specs.

    A tower spec whose ``name`` differs from the named model's tower replaces it; one without a ``name``
    (or with the same name) is merged into it, e.g. ``image_tower={"patch_dropout": 0.5}``.

    Raises:
        ValueError: no named model and a tower spec missing.
    """
    if model is None:
        if image_tower is None or text_tower is None:
            raise ValueError(
                "give a named model (`model=ViT-B-32`, see `mmclip models`) or both `image_tower` and "
                "`text_tower` specs ({'name': ..., **kwargs})"
            )
        return {"image_tower": dict(image_tower), "text_tower": dict(text_tower), **model_kwargs}
    config = get_model_config(model)
    for key, spec in (("image_tower", image_tower), ("text_tower", text_tower)):
        if spec is None:
            continue
        if "name" in spec and spec["name"] != config[key]["name"]:
            config[key] = dict(spec)
        else:
            config[key] = _merge(config[key], dict(spec))
    return _merge(config, model_kwargs)


class ContrastiveTask(pl.LightningModule):
    """Trains a dual encoder contrastively. Every argument is a plain spec, so checkpoints rebuild it.

    Args:
        model: a named config (``mmclip models`` lists them), or None to build from the tower specs.
        image_tower: image tower spec (``{"name": ..., **kwargs}``), replacing or refining the named one.
        text_tower: text tower spec, likewise.
        model_kwargs: further DualEncoder arguments (``embed_dim``, ``init_logit_bias``, ...).
        tokenizer: tokenizer name or path for ``get_tokenizer`` (the data module tokenizes with it).
        context_length: tokenizer row length (default: the text tower's).
        pretrained: weights loaded when a fresh fit starts (OpenAI / OpenCLIP file, mmclip or HF directory);
            not reloaded when resuming or loading a checkpoint.
        loss: loss spec, e.g. ``{"name": "clip"}`` or ``{"name": "siglip", "exchange": "ring"}``.
        optimizer: optimizer spec (see ``mmclip.tasks.optim.build_optimizer``): AdamW with decay by rule and
            per-tower learning rates.
        scheduler: schedule spec (see ``build_scheduler``): linear warmup then cosine, per optimizer step.
        lock_image: LiT lock of the image tower, ``{"unlocked_groups": 0, "freeze_norm": False,
            "lock_proj": True}`` or None.
        lock_text: the same for the text tower.
        patch_dropout: fraction of image patches dropped in training (FLIP; ViT towers).
        grad_checkpointing: recompute activations in backward to save memory.
        micro_batch_size: contrastive-correct accumulation: the batch is embedded in chunks of this size
            and the gradient equals that of the whole batch (``mmclip.losses.cached_feature_step``).
    """

    def __init__(
        self,
        model: str | None = "tiny-vit",
        image_tower: dict[str, Any] | None = None,
        text_tower: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer: str | None = "clip",
        context_length: int | None = None,
        pretrained: str | None = None,
        loss: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        lock_image: dict[str, Any] | None = None,
        lock_text: dict[str, Any] | None = None,
        patch_dropout: float = 0.0,
        grad_checkpointing: bool = False,
        micro_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        kwargs = dict(model_kwargs or {})
        # tower refinements may also come inside model_kwargs (a model recipe's own adjustments)
        image_tower = _merge(kwargs.pop("image_tower", {}), image_tower or {}) or None
        text_tower = _merge(kwargs.pop("text_tower", {}), text_tower or {}) or None
        config = build_model_config(model, image_tower, text_tower, **kwargs)
        self.model = DualEncoder.from_config(config)
        loss = dict(loss or {"name": "clip"})
        self.loss = LOSSES.build(loss.pop("name"), **loss)
        self.optimizer_spec = dict(optimizer or {})
        self.scheduler_spec = dict(scheduler or {})
        if patch_dropout:
            if not hasattr(self.model.image_tower, "patch_dropout"):
                raise ValueError(
                    f"patch_dropout needs a tower that supports it (clip_vit); "
                    f"{type(self.model.image_tower).__name__} does not"
                )
            self.model.image_tower.patch_dropout = float(patch_dropout)
        if lock_image is not None:
            self.model.lock_image_tower(**lock_image)
        if lock_text is not None:
            self.model.lock_text_tower(**lock_text)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if micro_batch_size is not None:
            if micro_batch_size < 1:
                raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
            self.automatic_optimization = False
        self._tokenizer = None
        self._throughput = Throughput()

    # ---- pieces the rest of the system asks for ----------------------------------------------------
    @property
    def data_config(self) -> Any:
        """The image tower's preprocessing settings (``DataConfig``) for the data module's transforms."""
        return self.model.data_config

    @property
    def tokenizer(self) -> Any:
        """The tokenizer named by the ``tokenizer`` spec (built once)."""
        if self._tokenizer is None:
            length = self.hparams.context_length or getattr(self.model.text_tower, "context_length", None)
            self._tokenizer = get_tokenizer(self.hparams.tokenizer, context_length=length)
            vocab = getattr(self.model.text_tower, "vocab_size", None)
            if vocab is not None and self._tokenizer.vocab_size > vocab:
                raise ValueError(
                    f"tokenizer {self.hparams.tokenizer!r} has {self._tokenizer.vocab_size} tokens but the text "
                    f"tower embeds only {vocab}: set text_tower.vocab_size or choose a matching tokenizer"
                )
        return self._tokenizer

    def setup(self, stage: str) -> None:
        if self.hparams.micro_batch_size is not None and str(self.trainer.precision).startswith("16"):
            raise ValueError(
                "micro_batch_size is not supported with 16-mixed precision; use bf16-mixed or 32"
            )
        if stage == "fit" and self.hparams.pretrained and getattr(self.trainer, "ckpt_path", None) is None:
            from mmclip.models.convert import load_pretrained_into

            load_pretrained_into(self.model, self.hparams.pretrained)
            log.info("loaded pretrained weights from %s", self.hparams.pretrained)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> Any:
        return self.model(images, input_ids)

    # ---- training ----------------------------------------------------------------------------------
    def training_step(self, batch: ImageTextBatch, batch_idx: int) -> torch.Tensor | None:
        self._count_skips(batch)
        if self.hparams.micro_batch_size is not None:
            losses = self._accumulated_step(batch)
        else:
            output = self.model(batch.images, batch.input_ids)
            losses = self.loss(output)
        self._log_scalars(losses, len(batch))
        return losses["loss"] if self.automatic_optimization else None

    def _accumulated_step(self, batch: ImageTextBatch) -> dict[str, torch.Tensor]:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        losses = cached_feature_step(
            self.model, self.loss, batch.images, batch.input_ids, self.hparams.micro_batch_size
        )
        clip_val = self.trainer.gradient_clip_val
        if clip_val:
            self.clip_gradients(opt, gradient_clip_val=clip_val, gradient_clip_algorithm="norm")
        opt.step()
        self.loss.clamp_(self.model.logit_scale)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return losses

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.loss.clamp_(self.model.logit_scale)  # temperature policy after every step

    def _count_skips(self, batch: ImageTextBatch) -> None:
        stats = getattr(getattr(self._trainer, "datamodule", None), "skip_stats", None)
        if stats is None:
            return
        stats.update(batch.skipped, len(batch))  # raises when the skipped fraction passes its ceiling
        self.log("data/skipped", float(stats.total_skipped), on_step=True, reduce_fx="max")

    def _log_scalars(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        # the loss terms, temperature, bias and positive / negative logit means the loss reports
        for key, value in losses.items():
            self.log(f"train/{key}", value.detach(), prog_bar=key == "loss", batch_size=batch_size)
        if "logit_scale" not in losses:
            self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=batch_size)
        if self.model.logit_bias is not None and "logit_bias" not in losses:
            self.log("train/logit_bias", self.model.logit_bias.detach(), batch_size=batch_size)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)

    def on_train_batch_end(self, outputs: Any, batch: ImageTextBatch, batch_idx: int) -> None:
        rate = self._throughput.update(len(batch) * self.trainer.world_size)  # over windows of >= 5 s
        if rate is not None:
            self.log("train/samples_per_sec", rate, rank_zero_only=True)

    # ---- evaluation loss on the validation loader ----------------------------------------------
    def validation_step(self, batch: ImageTextBatch, batch_idx: int) -> None:
        # one caption per image: the first caption of each image
        index = batch.text_to_image
        first = torch.full((len(batch),), -1, dtype=torch.long, device=index.device)
        order = torch.arange(index.numel(), device=index.device)
        first.scatter_reduce_(0, index, order, reduce="amin", include_self=False)
        if (first < 0).any():
            return  # an image without captions: nothing to pair it with
        output = self.model(batch.images, batch.input_ids[first])
        losses = self.loss(output)
        self.log("val/loss", losses["loss"], sync_dist=True, batch_size=len(batch))

    # ---- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.model, **self.optimizer_spec)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            total = self.trainer.max_steps
        scheduler = build_scheduler(optimizer, total_steps=int(total), **self.scheduler_spec)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- exact resume: the global random state (patch dropout, dropout) ------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmclip_rng"] = {"torch": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mmclip_rng")
        if state is not None:
            torch.set_rng_state(state["torch"])
