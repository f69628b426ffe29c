"""The report of a captioning run: greedy captions of held-out test images, scored and written to a folder.

"Held-out images" are test-split images, never seen in training. Two sets are captioned:

* single-shape test images (the data module's ``classification_dataloader("test")``, all 30 colour-shape
  classes): ``caption/attribute_accuracy`` is the fraction whose caption names the image's colour *and*
  shape (:func:`mmclip.metrics.captioning.attribute_accuracy`, mode "all"; ``..._exact``: and no other pair);
  ``caption/held_out_attribute_accuracy`` is the same on the six ``HELD_OUT_CLASSES`` pairs, which never occur
  in training as a pair (extra, not checked), ``caption/seen_attribute_accuracy`` on the other 24;
  ``caption/bleu4`` and ``caption/rougeL`` score the captions against the image's reference captions;
* multi-shape test scenes (``retrieval_dataloader("test")``, when ``scenes``): ``caption_scenes/...``, with
  ``attribute_accuracy`` requiring every object's colour-shape pair and ``attribute_accuracy_any`` one of them.

Attribute accuracy needs the synthetic shapes vocabulary, so it is computed for
:class:`~mmclip.data.SyntheticDataModule` data only; other data get BLEU-4 / ROUGE-L on their test split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmclip.data.batch import ImageTextBatch
from mmclip.data.synthetic import CLASSNAMES, COLORS, HELD_OUT_CLASSES, SHAPES, SyntheticShapes
from mmclip.metrics.captioning import attribute_matches, caption_scores

__all__ = ["CHECKED_METRIC", "caption_report"]

log = logging.getLogger(__name__)

CHECKED_METRIC = "caption/attribute_accuracy"


def _batches(loader: Any, max_images: int | None) -> Iterator[tuple[ImageTextBatch, int]]:
    """The loader's non-empty batches and how many of their images to use (``max_images`` in all)."""
    seen = 0
    for batch in loader or []:
        if len(batch) == 0:
            continue
        take = len(batch) if max_images is None else min(len(batch), max_images - seen)
        if take <= 0:
            return
        yield batch, take
        seen += take


def _references(batch: ImageTextBatch, rows: int) -> list[list[str]]:
    if batch.captions is None:
        raise ValueError(
            "the caption report needs the reference captions: set the data module's keep_captions"
        )
    refs: list[list[str]] = [[] for _ in range(rows)]
    for caption, row in zip(batch.captions or [], batch.text_to_image.tolist(), strict=True):
        if row < rows:
            refs[row].append(caption)
    return refs


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _single_shapes(task: Any, datamodule: Any, max_images: int | None) -> tuple[dict[str, float], list[dict]]:
    captions: list[str] = []
    refs: list[list[str]] = []
    labels: list[int] = []
    keys: list[str] = []
    for batch, take in _batches(datamodule.classification_dataloader("test"), max_images):
        if batch.labels is None:
            raise ValueError("the caption report needs labelled single-shape test images")
        captions += task.caption(batch.images[:take])
        refs += _references(batch, take)
        labels += batch.labels[:take].tolist()
        keys += batch.keys[:take]
    if not captions:
        raise ValueError("the data module has no labelled test images: set n_test / n_classification > 0")
    truths = [tuple(CLASSNAMES[label].split(" ", 1)) for label in labels]
    hits = attribute_matches(captions, truths, COLORS, SHAPES, mode="all")
    exact = attribute_matches(captions, truths, COLORS, SHAPES, mode="exact")
    held = set(HELD_OUT_CLASSES)
    metrics = {
        CHECKED_METRIC: _mean(hits),
        "caption/attribute_accuracy_exact": _mean(exact),
        "caption/seen_attribute_accuracy": _mean(
            [h for h, y in zip(hits, labels, strict=True) if y not in held]
        ),
        "caption/held_out_attribute_accuracy": _mean(
            [h for h, y in zip(hits, labels, strict=True) if y in held]
        ),
        "caption/num_images": float(len(captions)),
        "caption/num_held_out_images": float(sum(y in held for y in labels)),
        **{f"caption/{k}": v for k, v in caption_scores(captions, refs).items()},
    }
    rows = [
        {
            "set": "single",
            "key": k,
            "caption": c,
            "truth": " ".join(t),
            "held_out": y in held,
            "correct": h,
            "references": r,
        }
        for k, c, t, y, h, r in zip(keys, captions, truths, labels, hits, refs, strict=True)
    ]
    return metrics, rows


def _scenes(task: Any, datamodule: Any, max_images: int | None) -> tuple[dict[str, float], list[dict]]:
    from mmclip.data.synthetic_module import SyntheticDataModule

    captions, refs, keys = [], [], []
    for batch, take in _batches(datamodule.retrieval_dataloader("test"), max_images):
        captions += task.caption(batch.images[:take])
        refs += _references(batch, take)
        keys += batch.keys[:take]
    if not captions:
        return {}, []
    metrics = {f"caption_scenes/{k}": v for k, v in caption_scores(captions, refs).items()}
    metrics["caption_scenes/num_images"] = float(len(captions))
    rows = [
        {"set": "scenes", "key": k, "caption": c, "references": r}
        for k, c, r in zip(keys, captions, refs, strict=True)
    ]
    if isinstance(datamodule, SyntheticDataModule):
        n = datamodule.sizes["test"]
        source = SyntheticShapes(
            "test", n, datamodule.image_size, datamodule.data_seed, datamodule.captions_per_image
        )
        index = {source.key(i): i for i in range(n)}
        objects = [[(o.colour, o.shape) for o in source.scene(index[k]).objects] for k in keys]
        every = attribute_matches(captions, objects, COLORS, SHAPES, mode="all")
        some = attribute_matches(captions, objects, COLORS, SHAPES, mode="any")
        metrics["caption_scenes/attribute_accuracy"] = _mean(every)
        metrics["caption_scenes/attribute_accuracy_any"] = _mean(some)
        for row, objs, ok in zip(rows, objects, every, strict=True):
            row.update(truth=[" ".join(o) for o in objs], correct=ok)
    return metrics, rows


@torch.no_grad()
def caption_report(
    task: Any,
    datamodule: Any,
    out_dir: Path,
    num_samples: int = 16,
    min_attribute_accuracy: float = 0.8,
    scenes: bool = True,
    max_images: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Captions the held-out test images of ``datamodule`` with ``task`` (greedy) and writes the report.

    Writes ``out_dir/metrics.json`` (``{"metrics", "thresholds", "passed"}``) and ``out_dir/samples.jsonl``
    (the first ``num_samples`` captions of each set with their truth and references). See the module
    docstring for the metrics. ``max_new_tokens`` is read by the task itself (``task.caption``).

    Returns:
        ``{"metrics", "checks" ({metric: (value, target, ok)}), "passed", "dir"}``.
    """
    from mmclip.data.synthetic_module import SyntheticDataModule

    if getattr(datamodule, "scene_label", "none") != "none":
        raise ValueError(
            "the caption report reads colour-shape labels: use the data module's scene_label='none'"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    samples: list[dict] = []
    if isinstance(datamodule, SyntheticDataModule):
        single, rows = _single_shapes(task, datamodule, max_images)
        metrics.update(single)
        samples += rows[:num_samples]
    if scenes or not isinstance(datamodule, SyntheticDataModule):
        scene_metrics, rows = _scenes(task, datamodule, max_images)
        metrics.update(scene_metrics)
        samples += rows[:num_samples]
    thresholds = {CHECKED_METRIC: float(min_attribute_accuracy)}
    checks = {k: (metrics.get(k), v, metrics.get(k, float("-inf")) >= v) for k, v in thresholds.items()}
    passed = all(ok for _, _, ok in checks.values())
    (out_dir / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "thresholds": thresholds, "passed": passed}, indent=2)
    )
    with (out_dir / "samples.jsonl").open("w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    log.info("caption report written to %s (%s)", out_dir, "passed" if passed else "FAILED")
    return {"metrics": metrics, "checks": checks, "passed": passed, "dir": str(out_dir)}
