"""CaptioningTask: trains a ClipCap-style :class:`~mmclip.models.caption_prefix.PrefixCaptioner` under Lightning.

Every constructor argument is plain data (strings, numbers, dicts), so ``save_hyperparameters()`` records what
rebuilds the model and ``CaptioningTask.load_from_checkpoint(path, weights_only=True)`` works without hydra.
A tokenizer trained at construction time (``tokenizer={"kind": "bpe", ...}``) is kept in the hyperparameters
as its ``tokenizer.json`` text (``tokenizer_state``), so a loaded checkpoint rebuilds the identical tokenizer
without training it again.

Training is teacher forcing: the batch's caption strings (one per image) are tokenized with
:func:`~mmclip.models.caption_prefix.build_caption_targets` and the loss is the cross-entropy on the caption
tokens and their eos only (prefix and padding positions are ignored). :meth:`CaptioningTask.report` captions
held-out test images greedily and scores them (attribute accuracy, BLEU-4, ROUGE-L).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmclip.data.batch import ImageTextBatch
from mmclip.models.caption_prefix import CaptionTokenizer, PrefixCaptioner, build_caption_targets
from mmclip.models.dual_encoder import DualEncoder
from mmclip.tasks.base import TrainingTask

__all__ = ["CaptionDataTokenizer", "CaptioningTask", "synthetic_caption_corpus", "train_caption_tokenizer"]

log = logging.getLogger(__name__)

#: A 2-layer, 128-wide GPT-2 with random weights (its vocabulary size comes from the tokenizer).
DEFAULT_LM: dict[str, Any] = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 64}
DEFAULT_TOKENIZER: dict[str, Any] = {"kind": "bpe", "vocab_size": 384}
_MAPPER_KEYS = {"kind", "prefix_length", "hidden_dim", "layers", "heads", "clip_length"}
_BPE_KEYS = {"kind", "vocab_size", "num_scenes", "data_seed", "min_frequency"}
_EVAL_KEYS = {"max_new_tokens", "num_samples", "min_attribute_accuracy", "scenes", "max_images"}
_STATE_FORMAT = "hf-tokenizers-json"


# ---- tokenizer ---------------------------------------------------------------------------------
def synthetic_caption_corpus(num_scenes: int = 2000, data_seed: int = 0) -> list[str]:
    """The captions of the first ``num_scenes`` synthetic training scenes and single-shape training images.

    Only the ``train`` split is read (no held-out colour-shape pair occurs), without rendering any image.
    """
    from mmclip.data.collate import sample_rng
    from mmclip.data.synthetic import SyntheticShapes, captions_for

    captions: list[str] = []
    for kind, classes in (("scenes", "all"), ("classification", "seen")):
        source = SyntheticShapes("train", num_scenes, seed=data_seed, kind=kind, classes=classes)
        for i in range(num_scenes):
            rng = sample_rng(data_seed, "train", kind, i, "captions")  # as SyntheticShapes.get draws them
            captions += captions_for(source.scene(i), rng, source.captions_per_image)
    return captions


def train_caption_tokenizer(
    vocab_size: int = 384, num_scenes: int = 2000, data_seed: int = 0, min_frequency: int = 2
) -> dict[str, Any]:
    """Trains a byte-level BPE on the synthetic training captions; returns it as plain data.

    The result (``{"format", "json", "bos_token", "eos_token", "pad_token"}``, all strings) is what
    :class:`CaptioningTask` keeps in its hyperparameters; :func:`_tokenizer_from_state` rebuilds it.
    Training is deterministic: the same arguments give the same tokenizer.
    """
    from mmclip.tokenizers import train_bpe_tokenizer

    corpus = synthetic_caption_corpus(num_scenes, data_seed)
    with tempfile.TemporaryDirectory(prefix="mmclip-bpe-") as tmp:
        hf = train_bpe_tokenizer(corpus, vocab_size, tmp, min_frequency=min_frequency).tokenizer
        text = (Path(tmp) / "tokenizer.json").read_text(encoding="utf-8")
    return {
        "format": _STATE_FORMAT,
        "json": text,
        "bos_token": str(hf.bos_token),
        "eos_token": str(hf.eos_token),
        "pad_token": str(hf.pad_token),
    }


def _tokenizer_from_state(state: dict[str, Any]) -> Any:
    """A ``PreTrainedTokenizerFast`` from :func:`train_caption_tokenizer`'s plain-data form."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if state.get("format") != _STATE_FORMAT:
        raise ValueError(
            f"unknown tokenizer_state format {state.get('format')!r}; expected {_STATE_FORMAT!r}"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(state["json"]),
        bos_token=state["bos_token"],
        eos_token=state["eos_token"],
        pad_token=state["pad_token"],
        clean_up_tokenization_spaces=False,
    )


class CaptionDataTokenizer:
    """The data modules' tokenizer for captioning: ``texts -> (N, context_length)`` ids, caption + eos + padding.

    Implements :class:`mmclip.tokenizers.Tokenizer`. Batches built with it carry these ids in ``input_ids``;
    :class:`CaptioningTask` itself re-tokenizes ``batch.captions`` to get the padding mask as well.

    Args:
        tokenizer: the captioner's :class:`CaptionTokenizer`.
        context_length: row length (longer captions are cut).
    """

    def __init__(self, tokenizer: CaptionTokenizer, context_length: int) -> None:
        self.caption_tokenizer = tokenizer
        self._context_length = int(context_length)

    @property
    def vocab_size(self) -> int:
        return int(self.caption_tokenizer.vocab_size or 0)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def pad_token_id(self) -> int:
        return self.caption_tokenizer.pad_token_id

    @property
    def eot_token_id(self) -> int:
        return self.caption_tokenizer.eos_token_id

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self._context_length
        return build_caption_targets(self.caption_tokenizer, texts, length, pad_to_max_length=True).ids


def _check_keys(name: str, spec: dict[str, Any], known: set[str]) -> None:
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"unknown {name} keys {sorted(unknown)}; known: {sorted(known)}")


# ---- the task ----------------------------------------------------------------------------------
class CaptioningTask(TrainingTask):
    """Trains an image captioner (image encoder -> mapper -> GPT-2 prefix) with teacher forcing.

    Example (what ``recipes/experiment/caption_shapes.yaml`` builds, less a few options)::

        task = CaptioningTask(
            image_encoder={"name": "timm", "model_name": "test_resnet", "image_size": 64},
            freeze_image=False,
            mapper={"kind": "mlp", "prefix_length": 4},
            lm={"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 64},
            tokenizer={"kind": "bpe", "vocab_size": 384},
        )

    Args:
        image_encoder: a named model (``mmclip models``; its projected image embedding is used), a DualEncoder
            config (``{"image_tower": ..., "text_tower": ...}``), or an image tower spec ``{"name": ...}``.
        image_pretrained: weights for a named / DualEncoder image encoder (OpenAI / OpenCLIP file, mmclip or HF
            directory), loaded when a fresh fit starts (not when resuming or loading a checkpoint).
        freeze_image: keep the image encoder frozen (eval mode, no gradients), as ClipCap does.
        features: ``"pooled"`` (one vector per image) or ``"tokens"`` (patch tokens; transformer mapper).
        normalize_features: L2-normalise the image features before the mapper.
        mapper: ``{"kind": "mlp" | "transformer", "prefix_length": k, "hidden_dim": ..., "layers": ...,
            "heads": ..., "clip_length": ...}`` (see :class:`PrefixCaptioner`).
        lm: a GPT-2 config dict (random init; ``vocab_size`` defaults to the tokenizer's), or a local
            directory / hub id of a pretrained GPT-2.
        freeze_lm: freeze GPT-2 (the mapper still gets gradients through it).
        tokenizer: a local tokenizer directory or hub id (needed again when a checkpoint loads), or
            ``{"kind": "bpe", "vocab_size": 384, "num_scenes": 2000, "data_seed": 0, "min_frequency": 2}``
            to train a byte-level BPE on the synthetic training captions now (deterministic; kept in
            ``tokenizer_state``, so checkpoints carry it).
        max_caption_length: most caption tokens in training, eos included (longer captions are cut).
        optimizer: optimizer spec for :func:`~mmclip.tasks.optim.build_optimizer` (``image_lr`` applies to the
            image encoder).
        scheduler: schedule spec for :func:`~mmclip.tasks.optim.build_scheduler`, stepped every optimizer step.
        evaluation: :meth:`report` options: ``max_new_tokens`` (default: what fits the LM's positions, at
            most ``max_caption_length``), ``num_samples`` example captions written (16),
            ``min_attribute_accuracy`` checked (0.8), ``scenes`` (also caption multi-shape test scenes,
            True), ``max_images`` per set (None: all).
        tokenizer_state: set by the task itself when it trains a tokenizer; pass it only to rebuild one.
    """

    def __init__(
        self,
        image_encoder: str | dict[str, Any] = "tiny-vit",
        image_pretrained: str | None = None,
        freeze_image: bool = True,
        features: str = "pooled",
        normalize_features: bool = False,
        mapper: dict[str, Any] | None = None,
        lm: str | dict[str, Any] | None = None,
        freeze_lm: bool = False,
        tokenizer: str | dict[str, Any] | None = None,
        max_caption_length: int = 40,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
        tokenizer_state: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        mapper = dict(mapper or {"kind": "mlp"})
        _check_keys("mapper", mapper, _MAPPER_KEYS)
        _check_keys("evaluation", dict(evaluation or {}), _EVAL_KEYS)
        if max_caption_length < 2:
            raise ValueError(f"max_caption_length must be >= 2, got {max_caption_length}")
        hf_tokenizer = self._build_tokenizer(tokenizer, tokenizer_state)
        self.model = PrefixCaptioner(
            image_encoder=self._build_image_encoder(image_encoder),
            lm=DEFAULT_LM if lm is None else lm,
            tokenizer=hf_tokenizer,
            mapper=mapper.pop("kind", "mlp"),
            prefix_length=mapper.pop("prefix_length", 10),
            features=features,
            freeze_image=freeze_image,
            freeze_lm=freeze_lm,
            normalize_features=normalize_features,
            mapper_hidden=mapper.pop("hidden_dim", None),
            mapper_layers=mapper.pop("layers", 8),
            mapper_heads=mapper.pop("heads", 8),
            clip_length=mapper.pop("clip_length", None),
        )
        self.optimizer_spec = dict(optimizer or {})
        self.scheduler_spec = dict(scheduler or {})
        self._data_tokenizer: CaptionDataTokenizer | None = None

    # ---- construction helpers ----------------------------------------------------------------------
    def _build_tokenizer(self, spec: str | dict[str, Any] | None, state: dict[str, Any] | None) -> Any:
        if state is not None:
            return _tokenizer_from_state(state)
        spec = DEFAULT_TOKENIZER if spec is None else spec
        if isinstance(spec, str):
            return spec  # a directory or hub id: CaptionTokenizer loads it
        spec = dict(spec)
        _check_keys("tokenizer", spec, _BPE_KEYS)
        if spec.pop("kind", "bpe") != "bpe":
            raise ValueError(
                "a tokenizer spec dict trains one: {'kind': 'bpe', 'vocab_size': ...}; "
                "pass a directory or hub id as a string to load one"
            )
        state = train_caption_tokenizer(**spec)
        self.hparams["tokenizer_state"] = state  # saved with the checkpoint: no retraining on load
        return _tokenizer_from_state(state)

    def _build_image_encoder(self, spec: str | dict[str, Any]) -> Any:
        """The encoder module: a DualEncoder from any model source (its weights load in :meth:`setup`), or a
        bare image tower from a tower spec. The resolved spec is what the checkpoint records."""
        if not (isinstance(spec, str) or "image_tower" in spec):
            if self.hparams.image_pretrained is not None:
                raise ValueError(
                    "image_pretrained needs a model source or a DualEncoder config as image_encoder, not a tower spec"
                )
            return dict(spec)
        from mmclip.models.factory import resolve_model

        resolved = resolve_model(spec if isinstance(spec, str) else dict(spec))
        self.hparams["image_encoder"] = resolved.config
        if self.hparams.image_pretrained is None and resolved.weights is not None:
            self.hparams["image_pretrained"] = resolved.weights
        return DualEncoder.from_config(resolved.config)

    # ---- pieces the rest of the system asks for ----------------------------------------------------
    @property
    def data_config(self) -> Any:
        """The image tower's preprocessing settings (``DataConfig``)."""
        return self.model.data_config

    @property
    def caption_tokenizer(self) -> CaptionTokenizer:
        """The captioner's tokenizer (encode / decode, eos and pad ids)."""
        return self.model.tokenizer

    @property
    def tokenizer(self) -> CaptionDataTokenizer:
        """``list[str] -> LongTensor (T, max_caption_length)`` for the data module (caption + eos + padding)."""
        if self._data_tokenizer is None:
            self._data_tokenizer = CaptionDataTokenizer(
                self.caption_tokenizer, self.hparams.max_caption_length
            )
        return self._data_tokenizer

    def setup(self, stage: str) -> None:
        super().setup(stage)
        pretrained = self.hparams.image_pretrained
        if stage == "fit" and pretrained and getattr(self.trainer, "ckpt_path", None) is None:
            from mmclip.models.factory import create_model

            source = create_model(self.hparams.image_encoder, pretrained=pretrained)
            target = self.model.image_encoder
            target.tower.load_state_dict(source.image_tower.state_dict())
            if target.proj is not None:
                target.proj.load_state_dict(source.image_proj.state_dict())
            log.info("loaded pretrained image encoder weights from %s", pretrained)

    # ---- training ----------------------------------------------------------------------------------
    def _targets(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = build_caption_targets(self.caption_tokenizer, captions, self.hparams.max_caption_length)
        return ids.to(self.device), mask.to(self.device)  # (B, L), (B, L)

    def forward(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """The teacher-forced caption loss of ``images`` (B, 3, H, W) and their ``captions`` (B strings)."""
        ids, mask = self._targets(captions)
        return self.model(images, ids, mask).loss

    def training_step(self, batch: ImageTextBatch, batch_idx: int) -> torch.Tensor | None:
        if batch.captions is None:
            raise ValueError(
                "captioning needs the caption strings in batches: set the data module's keep_captions"
            )
        if len(batch.captions) != len(batch):
            raise ValueError(
                f"training batches carry one caption per image; got {len(batch.captions)} for {len(batch)} images"
            )
        self.count_skips(batch)
        if len(batch) == 0:
            return self.empty_batch_step()
        loss = self(batch.images, batch.captions)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch))
        self.log_lr(len(batch))
        return loss

    def validation_step(self, batch: ImageTextBatch, batch_idx: int) -> None:
        if not batch.captions or len(batch) == 0:
            return
        first = _first_caption(batch)
        if first is None:
            return
        loss = self(batch.images, [batch.captions[i] for i in first])
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch))

    # ---- captions ----------------------------------------------------------------------------------
    def max_new_tokens(self) -> int:
        """The report's caption budget: ``max_caption_length`` or what fits the LM's positions."""
        limit = self.hparams.max_caption_length
        n_positions = getattr(self.model.lm.config, "n_positions", None)
        if n_positions is not None:
            limit = min(limit, n_positions - self.model.prefix_length)
        return int((self.hparams.evaluation or {}).get("max_new_tokens", limit))

    @torch.no_grad()
    def caption(self, images: torch.Tensor, strategy: str = "greedy", **kwargs: Any) -> list[str]:
        """Captions of ``images`` (B, 3, H, W), prepared with :meth:`data_config` (see ``PrefixCaptioner.generate``)."""
        kwargs.setdefault("max_new_tokens", self.max_new_tokens())
        return self.model.generate(images.to(self.device), strategy=strategy, **kwargs)

    def report(self, datamodule: Any, out_dir: str | Path) -> dict[str, Any]:
        """Captions held-out test images greedily and scores them; writes ``metrics.json`` and ``samples.jsonl``.

        See :func:`mmclip.evaluation.caption_report.caption_report` for the metrics and the check.

        Returns:
            ``{"metrics", "checks" ({metric: (value, target, ok)}), "passed", "dir"}``.
        """
        from mmclip.evaluation.caption_report import caption_report

        return caption_report(self, datamodule, Path(out_dir), **dict(self.hparams.evaluation or {}))


def _first_caption(batch: ImageTextBatch) -> list[int] | None:
    """Index of the first caption of each image, or None when an image has none."""
    first: dict[int, int] = {}
    for t, row in enumerate(batch.text_to_image.tolist()):
        first.setdefault(row, t)
    if len(first) != len(batch):
        return None
    return [first[row] for row in range(len(batch))]
