"""ContrastiveTask: trains any DualEncoder with a CLIP or SigLIP loss under Lightning."""

from __future__ import annotations

import logging
from typing import Any

import torch

from mmclip.data.batch import ImageTextBatch
from mmclip.losses.accumulation import cached_feature_step
from mmclip.losses.base import EmptyBatchError
from mmclip.models.dual_encoder import DualEncoder
from mmclip.models.factory import (
    CHECKPOINT_MODEL_KEY,
    describes_architecture,
    load_weights,
    model_overrides,
    resolve_model,
)
from mmclip.registry import LOSSES
from mmclip.tasks.accelerate import compile_options, pad_text_for_compile
from mmclip.tasks.base import TrainingTask
from mmclip.tokenizers import get_tokenizer

__all__ = ["ContrastiveTask"]

log = logging.getLogger(__name__)


class ContrastiveTask(TrainingTask):
    """Trains a dual encoder contrastively. Every argument is plain data, so checkpoints rebuild the task.

    Args:
        model: any model source (``mmclip.create_model``): a named config (``mmclip models``), a spec dict, an
            mmclip / HF / OpenCLIP directory, a hub id, an ``hf-hub:`` repo, a ``.ckpt``, or a ``DualEncoder``
            built in code; None with both tower specs builds the model from them, and None with a
            ``pretrained`` directory, hub id or checkpoint takes the whole model from it. A source with weights (directory, hub, checkpoint) loads them when a fresh fit
            starts. The resolved spec is what the checkpoint records, so ``load_from_checkpoint`` needs
            neither hydra nor the original directory. A ``DualEncoder`` whose towers were passed as modules
            has no spec: its checkpoints reload with ``load_from_checkpoint(path, model=the_same_model)``.
        image_tower: image tower spec merged into the model's (a different ``name`` replaces the tower).
        text_tower: text tower spec, likewise.
        model_kwargs: further DualEncoder arguments (``embed_dim``, ``init_logit_bias``, ...), merged likewise.
        tokenizer: tokenizer for the data module (None: the model source's own; "clip"; a directory or hub id).
        context_length: tokenizer row length (default: the smaller of the tokenizer's and the text tower's).
        pretrained: weights loaded when a fresh fit starts (any source with weights; see ``create_model``);
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
        compile: ``torch.compile`` the model: true, a mode (``"default"``, ``"reduce-overhead"``,
            ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``) or a dict of ``torch.compile`` arguments.
            The state dict keeps its keys, so checkpoints are the same with and without.
        text_pad_multiple: under compile, captions are trimmed to the longest one rounded up to this multiple
            (at most one recompile); None keeps the tokenizer's full length (no recompile). Eager runs trim
            each batch to its longest caption regardless.
        ema: ``{"decay": 0.9999}`` keeps EMA weights (``TrainingTask.configure_ema``): saved and resumed with
            the checkpoint, used for validation and the report, and what the checkpoint gives as a model
            source.
    """

    def __init__(
        self,
        model: str | dict[str, Any] | DualEncoder | None = "tiny-vit",
        image_tower: dict[str, Any] | None = None,
        text_tower: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer: str | None = None,
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
        compile: bool | str | dict[str, Any] = False,
        text_pad_multiple: int | None = None,
        ema: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        overrides = model_overrides(model_kwargs, image_tower, text_tower)
        if model is None and image_tower and text_tower:
            model = {}  # the tower specs (and model_kwargs) are the whole spec
        elif model is None and pretrained is not None and describes_architecture(pretrained):
            model, pretrained = pretrained, None  # a directory, hub id or checkpoint is the whole model
        if model is None:
            raise ValueError(
                "ContrastiveTask needs a model source (a name, spec, directory, hub id, .ckpt or DualEncoder). "
                "Loading a checkpoint of a model built from tower modules? Pass it again: "
                "ContrastiveTask.load_from_checkpoint(path, model=the_same_model)"
            )
        resolved = resolve_model(model, pretrained, **overrides)
        self.model = resolved.instance or DualEncoder.from_config(resolved.config)
        self._model_tokenizer = resolved.tokenizer
        loss = dict(loss or {"name": "clip"})
        self.loss = LOSSES.build(loss.pop("name"), **loss)
        # the loss brings what it needs (a logit bias for sigmoid losses), in code and recipes alike
        self._added_by_loss = self.loss.prepare_model(self.model)
        if self._added_by_loss:
            log.info("added %s for %s", " and ".join(self._added_by_loss), type(self.loss).__name__)
        # the checkpoint records the model's spec (None for towers built in code) and where weights come from
        self.hparams["model"] = self.model.config
        self.hparams["pretrained"] = resolved.weights
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
        self.configure_ema(ema)  # before compiling: the average is an eager copy
        self._compiled = compile_options(compile)
        if self._compiled is not None:  # each tower in place: the state dict keeps its keys, and every road
            self.model.image_tower.compile(**self._compiled)  # through the towers (forward, encode_*,
            self.model.text_tower.compile(**self._compiled)  # micro-batches) runs compiled
        self._tokenizer = None

    # ---- pieces the rest of the system asks for ----------------------------------------------------
    @property
    def data_config(self) -> Any:
        """The image tower's preprocessing settings (``DataConfig``) for the data module's transforms."""
        return self.model.data_config

    @property
    def tokenizer(self) -> Any:
        """The data module's tokenizer: the ``tokenizer`` argument, else the model source's own (built once)."""
        if self._tokenizer is None:
            name = self.hparams.tokenizer or self._model_tokenizer
            length = self.hparams.context_length or getattr(self.model.text_tower, "context_length", None)
            self._tokenizer = get_tokenizer(name, context_length=length)
            vocab = getattr(self.model.text_tower, "vocab_size", None)
            if vocab is not None and self._tokenizer.vocab_size > vocab:
                raise ValueError(
                    f"tokenizer {name!r} has {self._tokenizer.vocab_size} tokens but the text tower embeds only "
                    f"{vocab}: set text_tower.vocab_size or choose a matching tokenizer"
                )
        return self._tokenizer

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.micro_batch_size is not None and str(self.trainer.precision).startswith("16"):
            raise ValueError(
                "micro_batch_size is not supported with 16-mixed precision; use bf16-mixed or 32"
            )
        if stage == "fit" and self.hparams.pretrained and getattr(self.trainer, "ckpt_path", None) is None:
            load_weights(self.model, self.hparams.pretrained, keep=self._added_by_loss)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> Any:
        return self.model(images, input_ids)

    # ---- training ----------------------------------------------------------------------------------
    def training_step(self, batch: ImageTextBatch, batch_idx: int) -> torch.Tensor | None:
        self.count_skips(batch)
        if len(batch) == 0 and self.trainer.world_size == 1:
            return None  # no sample left in this batch: skip the step
        try:  # with several processes the loss weighs each rank's rows, an empty share included
            if self.hparams.micro_batch_size is not None:
                losses = self._accumulated_step(batch)
            else:
                losses = self.loss(self.model(batch.images, self._text_ids(batch.input_ids)))
        except EmptyBatchError:  # no sample on any rank: every rank skips the update together
            return None if not self.automatic_optimization else self.skip_update()
        if len(batch):
            self._log_scalars(losses, len(batch))
        return losses["loss"] if self.automatic_optimization else None

    def _text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return ids  # eager text towers trim each batch themselves
        return pad_text_for_compile(ids, self.model.text_tower, self.hparams.text_pad_multiple)

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
        self.update_ema()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return losses

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.loss.clamp_(self.model.logit_scale)  # temperature policy after every step

    def _log_scalars(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        # the loss terms, temperature, bias and positive / negative logit means the loss reports
        for key, value in losses.items():
            self.log(f"train/{key}", value.detach(), prog_bar=key == "loss", batch_size=batch_size)
        if "logit_scale" not in losses:
            self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=batch_size)
        if self.model.logit_bias is not None and "logit_bias" not in losses:
            self.log("train/logit_bias", self.model.logit_bias.detach(), batch_size=batch_size)
        self.log_lr(batch_size)

    # ---- evaluation loss on the validation loader ----------------------------------------------
    def validation_step(self, batch: ImageTextBatch, batch_idx: int) -> None:
        # one caption per image: the first caption of each image
        index = batch.text_to_image
        first = torch.full((len(batch),), -1, dtype=torch.long, device=index.device)
        order = torch.arange(index.numel(), device=index.device)
        first.scatter_reduce_(0, index, order, reduce="amin", include_self=False)
        if (first < 0).any():
            return  # an image without captions: nothing to pair it with
        output = self.eval_model(batch.images, batch.input_ids[first])
        losses = self.loss(output)
        self.log("val/loss", losses["loss"], sync_dist=True, batch_size=len(batch))

    # ---- the model record that makes a checkpoint a model source ------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_MODEL_KEY] = {
            "config": self.model.config,
            "tokenizer": self.hparams.tokenizer or self._model_tokenizer,
            "weights": "ema.module." if self.ema is not None else "model.",  # the state-dict prefix to load
        }
