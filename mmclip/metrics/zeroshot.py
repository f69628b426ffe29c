"""Zero-shot classification: prompt templates -> class weights, and top-k / per-class recall metrics.

Templates are strings with the placeholder ``{}`` for the class name ("a photo of a {}.", the form
OpenAI's prompt lists and mmclip's data modules use) or callables ``classname -> prompt``. Every ``{}``
is replaced literally (``str.replace``, not ``str.format``), so other braces in a template are kept. A
template list can be shared by all classes or given per class as a dict ``{classname: [templates...]}``.

Class weights follow CLIP: per class, embed every prompt, L2-normalise each, average, L2-normalise again.
Logits are ``100 * normalize(image) @ W``.

Rank and ties: a sample's rank is the number of classes whose logit is strictly greater than its true
class's logit; it counts as correct at k when ``rank < k`` (ties go in the sample's favour). With fewer
than k classes top-k is 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mmclip.metrics.retrieval import unique_first_index

__all__ = [
    "DEFAULT_TEMPLATES",
    "PLACEHOLDER",
    "Template",
    "ZeroShotAccuracy",
    "build_zeroshot_classifier",
    "expand_prompts",
    "subset_scores",
    "zeroshot_logits",
]

PLACEHOLDER = "{}"

Template = str | Callable[[str], str]

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture showing a {}.",
    "an image that contains a {}.",
    "a close-up shot of a {}.",
    "a {} seen from far away.",
    "a blurry snapshot of a {}.",
    "a well-lit photograph of a {}.",
    "a dim, poorly lit photo of a {}.",
    "a quick sketch of a {}.",
    "a digital rendering of a {}.",
    "a cropped picture of the {}.",
    "a low-resolution image of a {}.",
    "a {} in the middle of the frame.",
    "an example of a {}.",
    "a snapshot with a {} in it.",
    "the {}, photographed outdoors.",
)
"""mmclip's general-purpose prompt set (written for this project; placeholder ``{}``)."""


def _fill(template: Template, classname: str) -> str:
    if callable(template):
        prompt = template(classname)
        if not isinstance(prompt, str):
            raise TypeError(f"a template callable must return a string, got {type(prompt).__name__}")
        return prompt
    if not isinstance(template, str):
        raise TypeError(f"a template is a string or a callable, got {type(template).__name__}")
    if PLACEHOLDER not in template:
        hint = ' (mmclip uses "{}", not "{c}")' if "{c}" in template else ""
        raise ValueError(f"template {template!r} has no {PLACEHOLDER} placeholder for the class name{hint}")
    return template.replace(PLACEHOLDER, classname)


def expand_prompts(
    classnames: Sequence[str],
    templates: Sequence[Template] | Mapping[str, Sequence[Template]] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Every (class, template) prompt, and the class index of each.

    Args:
        classnames: the C class names, in label order.
        templates: a list shared by all classes, a dict ``{classname: templates}`` covering every class,
            or None for :data:`DEFAULT_TEMPLATES`.

    Returns:
        The prompts (class-major) and a ``(P,)`` long tensor of their class indices.
    """
    if isinstance(classnames, str) or not classnames:
        raise ValueError("classnames must be a non-empty list of strings")
    if templates is None:
        templates = DEFAULT_TEMPLATES
    prompts: list[str] = []
    owners: list[int] = []
    for i, name in enumerate(classnames):
        if isinstance(templates, Mapping):
            if name not in templates:
                raise KeyError(f"no templates for class {name!r} in the per-class template dict")
            own = templates[name]
        else:
            own = templates
        if isinstance(own, str) or len(own) == 0:
            raise ValueError(f"class {name!r} needs a non-empty list of templates, got {own!r}")
        for template in own:
            prompts.append(_fill(template, name))
            owners.append(i)
    return prompts, torch.tensor(owners, dtype=torch.long)


@torch.no_grad()
def build_zeroshot_classifier(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template] | Mapping[str, Sequence[Template]] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Class weights ``(D, C)`` for zero-shot classification.

    Prompts are encoded ``batch_size`` at a time (batches cut across classes; each class's sum is
    accumulated), so memory does not grow with the number of classes or templates.

    Args:
        model: anything with ``encode_text(ids, normalize=True) -> (B, D)`` (a ``DualEncoder``).
        tokenizer: ``tokenizer(list_of_str) -> (B, L)`` token ids.
        classnames: the C class names, in label order.
        templates: see :func:`expand_prompts`.
        batch_size: prompts per forward pass.
        device: where to run the text tower (default: the model's parameters' device).

    Returns:
        ``(D, C)`` float32, each column L2-normalised.
    """
    prompts, owners = expand_prompts(classnames, templates)
    if device is None:
        device = next(model.parameters()).device
    sums: torch.Tensor | None = None
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[start : start + batch_size]).to(device)  # (b, L)
        emb = F.normalize(model.encode_text(ids).float(), dim=-1)  # (b, D)
        if sums is None:
            sums = emb.new_zeros(len(classnames), emb.shape[1])  # (C, D)
        sums.index_add_(0, owners[start : start + batch_size].to(emb.device), emb)
    assert sums is not None
    counts = torch.bincount(owners, minlength=len(classnames)).to(sums)  # (C,)
    return F.normalize(sums / counts[:, None], dim=-1).T.contiguous()  # (D, C)


def zeroshot_logits(
    image_embeds: torch.Tensor, classifier: torch.Tensor, scale: float = 100.0
) -> torch.Tensor:
    """``(B, C)`` float32 logits ``scale * normalize(image) @ classifier`` (autocast disabled)."""
    with torch.autocast(image_embeds.device.type, enabled=False):
        image = F.normalize(image_embeds.float(), dim=-1)  # (B, E)
        return scale * image @ classifier.to(image.device, torch.float32)  # (B, C)


class ZeroShotAccuracy(Metric):
    """Top-k accuracy and per-class recall from classifier logits, synced and deduplicated across processes.

    ``compute()`` returns scalars ``top1``, ``top5`` (one per k) and ``mean_per_class_recall`` (balanced
    accuracy: the mean over classes that have samples of their top-1 recall), and vectors
    ``per_class_recall`` ``(C,)`` (NaN for classes without samples) and ``per_class_count`` ``(C,)``, so a
    caller can score any subset of classes (:func:`subset_scores`). Samples labelled ``-1`` are ignored.

    Args:
        num_classes: C.
        topk: the k of top-k accuracy.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, topk: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.topk = tuple(int(k) for k in topk)
        self.add_state("ids", default=[], dist_reduce_fx="cat")  # (N,)
        self.add_state("labels", default=[], dist_reduce_fx="cat")  # (N,)
        self.add_state("ranks", default=[], dist_reduce_fx="cat")  # (N,)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Adds a batch.

        Args:
            logits: ``(B, C)``.
            labels: ``(B,)`` class indices, ``-1`` for unknown (skipped).
            ids: ``(B,)`` non-negative global sample ids: samples seen twice (across processes or
                batches) count once. ``None``: no deduplication.
        """
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
        labels = labels.to(logits.device).long()
        if ids is None:
            ids = torch.full_like(labels, -1)
        ids = ids.to(logits.device).long()
        known = labels >= 0
        logits, labels, ids = logits[known], labels[known], ids[known]
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} out of range for {self.num_classes} classes")
        true = logits.gather(1, labels[:, None])  # (B, 1)
        ranks = (logits > true).sum(1)  # (B,)
        self.ids.append(ids.to(self.device))
        self.labels.append(labels.to(self.device))
        self.ranks.append(ranks.to(self.device))

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Syncs like ``Metric.sync``; a process that saw no data contributes typed empty tensors."""
        for name in ("ids", "labels", "ranks"):
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                state.append(torch.zeros(0, dtype=torch.long, device=self.device))
        super().sync(*args, **kwargs)

    def compute(self) -> dict[str, torch.Tensor]:
        ids = dim_zero_cat(self.ids).long()
        labels = dim_zero_cat(self.labels).long()
        ranks = dim_zero_cat(self.ranks).long()
        if labels.numel() == 0:
            raise ValueError("ZeroShotAccuracy.compute called before any labelled samples were added")
        with_id = ids >= 0
        if with_id.any():
            keyed = with_id.nonzero().squeeze(1)
            keep = torch.cat([keyed[unique_first_index(ids[keyed])], (~with_id).nonzero().squeeze(1)])
            labels, ranks = labels[keep], ranks[keep]
        out: dict[str, torch.Tensor] = {}
        for k in self.topk:
            out[f"top{k}"] = (ranks < k).double().mean()
        count = torch.bincount(labels, minlength=self.num_classes)  # (C,)
        correct = torch.bincount(labels, weights=(ranks == 0).double(), minlength=self.num_classes)  # (C,)
        recall = correct / count.clamp_min(1)
        recall[count == 0] = float("nan")
        out["mean_per_class_recall"] = recall[count > 0].mean()
        out["per_class_recall"] = recall
        out["per_class_count"] = count
        return out


def subset_scores(
    per_class_recall: torch.Tensor,
    per_class_count: torch.Tensor,
    classes: Sequence[int],
) -> dict[str, float]:
    """Top-1 accuracy over the samples of some classes, and their mean per-class recall.

    Predictions are still among all classes; only the scored samples are restricted. Classes without
    samples are left out of both numbers.

    Args:
        per_class_recall: ``(C,)`` from :class:`ZeroShotAccuracy`.
        per_class_count: ``(C,)`` from :class:`ZeroShotAccuracy`.
        classes: class indices of the subset.

    Returns:
        ``{"top1": ..., "mean_per_class_recall": ...}`` (NaN when no class of the subset has samples).
    """
    idx = torch.as_tensor(list(classes), dtype=torch.long, device=per_class_count.device)
    count = per_class_count[idx].double()
    recall = per_class_recall[idx].double()
    present = count > 0
    if not present.any():
        return {"top1": float("nan"), "mean_per_class_recall": float("nan")}
    top1 = float((recall[present] * count[present]).sum() / count[present].sum())
    return {"top1": top1, "mean_per_class_recall": float(recall[present].mean())}
