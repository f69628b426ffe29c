"""FeaturizerTask: a small model trained on the features of a frozen image tower.

The frozen tower goes through :class:`mmclip.models.featurizer.Featurizer`, so it is outside the task's
module tree: the optimizer, ``train()``, ``requires_grad_()`` and the checkpoints never reach it. On top:

- ``features="tokens"``: the tower's patch tokens (or one block's output, ``layer``), read by an optional
  :class:`~mmclip.layers.perceiver.PerceiverResampler` whose latents are averaged (without one, the tokens
  are averaged), then the head;
- ``features="pooled"``: the tower's pooled vector (optionally the dual encoder's projected embedding),
  then the head: a "scoring head on pooled embeddings", as aesthetic-ranking predictors are built.

Heads: ``"classify"`` (cross-entropy on the batch ``labels``, accuracy logged) or ``"regress"`` (mean
squared error with the label read as a number, MSE / Pearson / Spearman logged). Samples with label -1
(unknown) are left out. On the synthetic data with ``scene_label="count"`` the label is the number of
shapes - 1, so the classifier counts shapes and the regressor predicts the count (offset by one, which
changes neither the MSE nor the correlations).

The frozen weights are not saved in checkpoints (only their fingerprint): they are rebuilt from
``pretrained`` or, without it, from a random init under ``tower_seed``, so ``load_from_checkpoint`` gives
back the same model and a checkpoint of other frozen weights is refused.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.data.batch import ImageTextBatch
from mmclip.layers.perceiver import PerceiverResampler
from mmclip.models.dual_encoder import DualEncoder
from mmclip.models.featurizer import Featurizer
from mmclip.registry import IMAGE_TOWERS
from mmclip.tasks.base import TrainingTask

__all__ = ["FeaturizerTask", "build_frozen_encoder"]

log = logging.getLogger(__name__)

_FEATURES = ("tokens", "pooled")
_HEADS = ("classify", "regress")
#: What the recipes reach on the synthetic counting data (see the featurize_* experiments), with a margin.
DEFAULT_THRESHOLDS = {"classify": {"test/accuracy": 0.8}, "regress": {"test/r2": 0.35}}


class _NoTextTokenizer:
    """The tokenizer handed to the data module when the task reads no text: one pad token per caption.

    Data modules tokenize captions whatever the task; this keeps that free.
    """

    vocab_size = 1
    context_length = 1
    pad_token_id = 0
    eot_token_id = 0

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        n = 1 if isinstance(texts, str) else len(texts)
        return torch.zeros(n, context_length or 1, dtype=torch.long)  # (T, L)


def _load_tower(tower: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Loads the ``image_tower.*`` entries of a dual-encoder state dict into a bare image tower."""
    from mmclip.models.convert import CheckpointError

    sub = {k[len("image_tower.") :]: v for k, v in state.items() if k.startswith("image_tower.")}
    if not sub:
        raise CheckpointError(f"{source} has no image tower weights ('image_tower.*' keys)")
    expected = tower.state_dict()
    problems = [k for k in expected if k not in sub] + [k for k in sub if k not in expected]
    problems += [
        f"{k}: checkpoint {tuple(v.shape)} vs tower {tuple(expected[k].shape)}"
        for k, v in sub.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise CheckpointError(
            f"the image tower weights of {source} do not fit the tower spec ({len(problems)} problems, e.g. "
            f"{problems[:3]}); give the image_tower spec the checkpoint was trained with"
        )
    tower.load_state_dict(sub)


def build_frozen_encoder(
    model: Any = None,
    image_tower: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """The encoder a ``FeaturizerTask`` freezes: a ``DualEncoder`` from any model source, or a bare image tower.

    The modules are built under ``torch.manual_seed(seed)`` (the global random state is restored after),
    so a tower without pretrained weights is the same random tower every time.

    Args:
        model: any model source (``mmclip.create_model``: a name, spec, directory, hub id, ``.ckpt``), with
            ``image_tower`` / ``model_kwargs`` refining it; or None for a bare image tower.
        image_tower: image tower spec (refines the model's, or is the bare tower).
        model_kwargs: further DualEncoder arguments (with ``model`` only).
        pretrained: weights (any source with weights). With ``model=None``, a source that describes its own
            architecture (directory, hub id, ``.ckpt``) gives the tower, architecture and weights, and the
            ``image_tower`` spec is not used; a weights file loads its ``image_tower.*`` weights into the spec's.
        seed: seed of the random init.
    """
    from mmclip.models.factory import (
        describes_architecture,
        model_overrides,
        resolve_model,
        weights_file_state,
    )

    if model is None and pretrained is not None and describes_architecture(pretrained):
        model, image_tower = pretrained, None
        log.info("frozen image tower: architecture and weights from %s", pretrained)
        if model_kwargs:
            raise ValueError("model_kwargs apply to a model source; pass task.model instead of task.pretrained")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model is None:
            if image_tower is None:
                raise ValueError("give a model source (model=tiny-vit) or an image_tower spec {'name': ...}")
            if model_kwargs:
                raise ValueError(
                    f"model_kwargs {sorted(model_kwargs)} apply to a model source's DualEncoder; a bare "
                    "image tower takes its options in the image_tower spec"
                )
            encoder: nn.Module = IMAGE_TOWERS.build(dict(image_tower))
            weights = pretrained
        else:
            resolved = resolve_model(model, pretrained, **model_overrides(model_kwargs, image_tower))
            encoder = resolved.instance or DualEncoder.from_config(resolved.config)
            weights = resolved.weights
    if weights:
        if isinstance(encoder, DualEncoder):
            from mmclip.models.factory import load_weights

            load_weights(encoder, weights)
        else:
            _load_tower(encoder, weights_file_state(weights), Path(weights))
        log.info("frozen image encoder weights loaded from %s", weights)
    return encoder


class FeaturizerTask(TrainingTask):
    """Trains a resampler and/or head on a frozen image tower's features. Every argument is plain data.

    Args:
        model: any model source whose image tower is frozen (a name, spec, directory, hub id, ``.ckpt``), or
            None for the bare ``image_tower``.
        image_tower: image tower spec (refines the named model's, or is the tower).
        model_kwargs: further DualEncoder arguments of a named model.
        pretrained: weights of the frozen encoder (see :func:`build_frozen_encoder`); None keeps the
            random init drawn under ``tower_seed``.
        tower_seed: seed of the frozen encoder's init (so checkpoints of a random tower reload).
        features: "tokens" (patch tokens, resampled or averaged) or "pooled" (one vector per image).
        layer: with "tokens", read this block's output instead of the final tokens (e.g. -2); for towers
            whose blocks have the token width (ViTs, text-style transformers).
        project: with "pooled", use the dual encoder's projected embedding (named models only).
        normalize: with "pooled", L2-normalise the vector.
        resampler: ``PerceiverResampler`` arguments (``num_latents``, ``depth``, ``heads``, ``dim_head``,
            ``ff_mult``; ``dim`` adds a linear map from the token width to it), or None. "tokens" only.
        head: "classify" (cross-entropy, ``num_classes`` logits) or "regress" (one score, MSE).
        num_classes: classes of the classification head.
        hidden_dim: width of the head's hidden layer (None: a linear head). The head is LayerNorm, then
            [Linear, GELU, Dropout] when ``hidden_dim`` is set, then Linear.
        dropout: dropout of the hidden layer.
        optimizer: optimizer spec for ``mmclip.tasks.optim.build_optimizer``.
        scheduler: schedule spec for ``build_scheduler``.
        tokenizer: tokenizer name for the data module (None: a no-op tokenizer, this task reads no text).
        thresholds: ``{metric: minimum}`` checked by :meth:`report` (default :data:`DEFAULT_THRESHOLDS`).
    """

    def __init__(
        self,
        model: str | dict[str, Any] | None = "tiny-vit",
        image_tower: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        tower_seed: int = 0,
        features: str = "tokens",
        layer: int | None = None,
        project: bool = False,
        normalize: bool = False,
        resampler: dict[str, Any] | None = None,
        head: str = "classify",
        num_classes: int = 3,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        thresholds: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if features not in _FEATURES:
            raise ValueError(f"features must be one of {_FEATURES}, got {features!r}")
        if head not in _HEADS:
            raise ValueError(f"head must be one of {_HEADS}, got {head!r}")
        if features == "pooled" and (resampler is not None or layer is not None):
            raise ValueError("resampler and layer read tokens: use features='tokens', or drop them")
        if features == "tokens" and (project or normalize):
            raise ValueError("project and normalize apply to pooled features: use features='pooled'")
        if head == "classify" and num_classes < 2:
            raise ValueError(f"a classification head needs num_classes >= 2, got {num_classes}")
        encoder = build_frozen_encoder(model, image_tower, model_kwargs, pretrained, tower_seed)
        self.featurizer = Featurizer(
            encoder,
            output=features,
            layers=None if layer is None else [layer],
            modality="image",
            project=project,
            normalize=normalize,
        )
        width = self.featurizer.token_dim if features == "tokens" else self.featurizer.output_dim
        self.in_proj: nn.Module = nn.Identity()
        self.resampler: PerceiverResampler | None = None
        if resampler is not None:
            spec = dict(resampler)
            dim = int(spec.pop("dim", width))
            if dim != width:
                self.in_proj = nn.Linear(width, dim)
            self.resampler = PerceiverResampler(dim, **spec)
            width = dim
        self.feature_dim = width
        out = num_classes if head == "classify" else 1
        layers: list[nn.Module] = [nn.LayerNorm(width)]
        if hidden_dim:
            layers += [nn.Linear(width, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            width = hidden_dim
        layers.append(nn.Linear(width, out))
        self.head = nn.Sequential(*layers)
        self.optimizer_spec = dict(optimizer or {})
        self.scheduler_spec = dict(scheduler or {"name": None})
        default = DEFAULT_THRESHOLDS[head]
        self.thresholds = dict(default if thresholds is None else thresholds)
        self._tokenizer: Any = None

    # ---- pieces the rest of the system asks for ----------------------------------------------------
    @property
    def data_config(self) -> Any:
        """The frozen image tower's preprocessing settings (``DataConfig``)."""
        return self.featurizer.data_config

    @property
    def tokenizer(self) -> Any:
        """The tokenizer the data module uses (captions are not read by this task)."""
        if self._tokenizer is None:
            if self.hparams.tokenizer is None:
                self._tokenizer = _NoTextTokenizer()
            else:
                from mmclip.tokenizers import get_tokenizer

                self._tokenizer = get_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    # ---- the model ----------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, feature_dim) features entering the head (trainable parts included)."""
        out = self.featurizer(images)
        if self.hparams.features == "pooled":
            return out.pooled.float()  # (B, D)
        tokens = (out.layers[0] if out.layers is not None else out.tokens).float()  # (B, N, D')
        mask = out.mask if out.layers is None else None  # intermediate layers carry every token
        tokens = self.in_proj(tokens)  # (B, N, D)
        if self.resampler is not None:
            return self.resampler(tokens, mask).mean(dim=(1, 2))  # (B, T=1, n, D) -> (B, D)
        if mask is None:
            return tokens.mean(dim=1)  # (B, D)
        weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) for "classify", scores (B,) for "regress"."""
        out = self.head(self.features(images))  # (B, C) or (B, 1)
        return out if self.hparams.head == "classify" else out.squeeze(-1)

    # ---- training ----------------------------------------------------------------------------------
    def _labelled(self, batch: ImageTextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.labels is None:
            raise ValueError(
                "FeaturizerTask trains on batches with labels, and this data module yields none: for the "
                "synthetic data set scene_label='count' (recipe data=synthetic_count), or use a data set "
                "with labels"
            )
        keep = batch.labels >= 0  # (B,), -1 = unknown
        return batch.images[keep], batch.labels[keep]

    def training_step(self, batch: ImageTextBatch, batch_idx: int) -> torch.Tensor | None:
        self.count_skips(batch)
        images, labels = self._labelled(batch)
        if len(labels) == 0:
            return self.empty_batch_step()  # nothing labelled in this batch
        out = self(images)
        n = len(labels)
        if self.hparams.head == "classify":
            loss = F.cross_entropy(out, labels)
            accuracy = (out.argmax(-1) == labels).float().mean()
            self.log("train/accuracy", accuracy, prog_bar=True, batch_size=n)
        else:
            target = labels.to(out.dtype)  # (B,)
            loss = F.mse_loss(out, target)
            self.log("train/mse", loss.detach(), batch_size=n)
            if n >= 3 and target.std() > 0 and out.detach().std() > 0:
                from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

                pred = out.detach().float()
                self.log("train/pearson", pearson_corrcoef(pred, target.float()), batch_size=n)
                self.log("train/spearman", spearman_corrcoef(pred, target.float()), batch_size=n)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log_lr(n)
        return loss

    def optimized_module(self) -> nn.Module:
        return self  # the resampler and head; the frozen tower is kept outside the task's parameters

    def on_train_start(self) -> None:
        """Checks that only the trainable parts are optimised and that the frozen tower has no gradients.

        Raises:
            RuntimeError: a frozen parameter requires grad or is in an optimizer, or a trainable one is not.
        """
        frozen = list(self.featurizer.frozen.parameters())
        if any(p.requires_grad for p in frozen):
            raise RuntimeError("a parameter of the frozen image tower requires grad: something unfroze it")
        frozen_ids = {id(p) for p in frozen}
        optimised = {id(p) for opt in self.trainer.optimizers for g in opt.param_groups for p in g["params"]}
        if optimised & frozen_ids:
            raise RuntimeError(
                f"{len(optimised & frozen_ids)} frozen tower parameters are in the optimizer; build it from "
                "the task's parameters (the Featurizer keeps the tower outside them)"
            )
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        if optimised != trainable:
            raise RuntimeError(
                f"the optimizer holds {len(optimised)} tensors but the resampler and head have "
                f"{len(trainable)} trainable ones"
            )

    def on_fit_end(self) -> None:
        """Raises ``FrozenWeightsError`` if the frozen tower changed during fit."""
        self.featurizer.verify_unchanged()

    # ---- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_loader(self, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and labels over a labelled loader: ((N, C) logits or (N,) scores, (N,) labels), on the CPU."""
        was_training = self.training
        self.eval()
        outputs, labels = [], []
        try:
            for batch in loader:
                images, target = self._labelled(batch)
                if len(target) == 0:
                    continue
                outputs.append(self(images.to(self.device)).float().cpu())
                labels.append(target.cpu())
        finally:
            self.train(was_training)
        if not outputs:
            raise ValueError("the evaluation loader yielded no labelled sample")
        return torch.cat(outputs), torch.cat(labels)

    def evaluate(self, loader: Any) -> dict[str, float]:
        """Test metrics over a labelled loader, with the chance levels they compare to.

        "classify": ``accuracy``, ``chance_majority`` (always answering the most frequent test class) and
        ``chance_uniform`` (1 / num_classes). "regress": ``mse``, ``rmse``, ``pearson``, ``spearman``,
        ``chance_mse`` (always predicting the test mean: the target variance), ``r2`` = 1 - mse /
        chance_mse, and ``rounded_accuracy`` (prediction rounded to the nearest label).
        """
        out, labels = self.predict_loader(loader)
        n = len(labels)
        counts = torch.bincount(labels)
        if self.hparams.head == "classify":
            return {
                "test/accuracy": float((out.argmax(-1) == labels).float().mean()),
                "test/chance_majority": float(counts.max()) / n,
                "test/chance_uniform": 1.0 / self.hparams.num_classes,
                "test/n": float(n),
            }
        from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

        target = labels.double()
        pred = out.double()
        mse = float(F.mse_loss(pred, target))
        var = float(target.var(unbiased=False))
        return {
            "test/mse": mse,
            "test/rmse": math.sqrt(mse),
            "test/chance_mse": var,
            "test/r2": 1.0 - mse / var if var > 0 else float("nan"),
            "test/pearson": float(pearson_corrcoef(pred.float(), target.float())),
            "test/spearman": float(spearman_corrcoef(pred.float(), target.float())),
            "test/rounded_accuracy": float((pred.round() == target).double().mean()),
            "test/n": float(n),
        }

    def report(self, datamodule: Any, out_dir: str | Path) -> dict[str, Any]:
        """Evaluates on ``datamodule.classification_dataloader("test")`` and writes ``out_dir/metrics.json``
        and ``summary.md``.

        Returns:
            ``{"metrics", "checks" ({metric: (value, minimum, passed)}), "passed", "dir"}``.
        """
        loader = datamodule.classification_dataloader("test", 0, 1)
        if loader is None:
            raise ValueError(
                f"{type(datamodule).__name__} has no labelled test split (classification_dataloader('test') is "
                "None); for the synthetic data set use scene_label='count'"
            )
        metrics = self.evaluate(loader)
        checks = {
            k: (metrics.get(k), v, metrics.get(k, float("-inf")) >= v) for k, v in self.thresholds.items()
        }
        passed = all(ok for _, _, ok in checks.values())
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(
            json.dumps({"metrics": metrics, "thresholds": self.thresholds, "passed": passed}, indent=2)
        )
        lines = [
            f"# FeaturizerTask report ({self.hparams.features} features, {self.hparams.head} head)",
            "",
            "| metric | value | target | |",
            "|---|---|---|---|",
        ]
        for key, value in metrics.items():
            target = self.thresholds.get(key)
            mark = "" if target is None else ("pass" if value >= target else "FAIL")
            lines.append(f"| {key} | {value:.4f} | {'' if target is None else f'>= {target}'} | {mark} |")
        lines += ["", f"Result: **{'passed' if passed else 'FAILED'}**", ""]
        (out / "summary.md").write_text("\n".join(lines))
        log.info("report written to %s (%s)", out, "passed" if passed else "FAILED")
        return {"metrics": metrics, "checks": checks, "passed": passed, "dir": str(out)}
