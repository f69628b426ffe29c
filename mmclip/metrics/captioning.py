"""Caption metrics: BLEU-4 and ROUGE-L (torchmetrics.text) and attribute accuracy on synthetic shapes.

Texts are normalised before scoring (lower-case, punctuation removed, whitespace collapsed) so that
"A red circle." and "a red circle" match; BLEU is corpus-level BLEU-4 (no smoothing) against every
reference of an image, ROUGE-L the F-measure against the best-matching reference, averaged over images.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "CaptionMetrics",
    "attribute_accuracy",
    "attribute_matches",
    "caption_scores",
    "extract_attribute_pairs",
    "normalize_caption",
]

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")
_MODES = ("all", "any", "exact")


def normalize_caption(text: str) -> str:
    """Lower-case, punctuation replaced by spaces, whitespace collapsed and stripped."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def _check_pairs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a list of strings, one per image")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    for refs in references:
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError("each image needs a non-empty list of reference strings")


class CaptionMetrics(nn.Module):
    """Accumulating BLEU-4 and ROUGE-L (torchmetrics ``BLEUScore(n_gram=4)``, ``ROUGEScore("rougeL")``).

    The inner torchmetrics states synchronise across processes in :meth:`compute`.

    Example::

        metrics = CaptionMetrics()
        metrics.update(["a red circle"], [["a red circle", "one red circle"]])
        metrics.compute()  # {"bleu4": tensor(1.), "rougeL": tensor(1.)}
    """

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.text import BLEUScore, ROUGEScore

        self.bleu = BLEUScore(n_gram=4)
        self.rouge = ROUGEScore(rouge_keys="rougeL")

    def update(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Adds one caption per image and its list of reference captions."""
        _check_pairs(hypotheses, references)
        hyps = [normalize_caption(h) for h in hypotheses]
        refs = [[normalize_caption(r) for r in rs] for rs in references]
        self.bleu.update(hyps, refs)
        self.rouge.update(hyps, refs)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"bleu4": ..., "rougeL": ...}`` (ROUGE-L F-measure), scalars in [0, 1]."""
        rouge = self.rouge.compute()
        return {"bleu4": self.bleu.compute(), "rougeL": rouge["rougeL_fmeasure"]}

    def reset(self) -> None:
        self.bleu.reset()
        self.rouge.reset()


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-4 and ROUGE-L of one caption per image against that image's references.

    Args:
        hypotheses: N generated captions.
        references: N lists of reference captions (several per image allowed).

    Returns:
        ``{"bleu4": float, "rougeL": float}``.
    """
    metrics = CaptionMetrics()
    metrics.update(hypotheses, references)
    return {k: float(v) for k, v in metrics.compute().items()}


# ---- attribute accuracy ------------------------------------------------------------------------
def _vocab_words(vocab: Iterable[str]) -> dict[str, str]:
    """Normalised vocabulary word (multi-word terms joined with "_") -> the term."""
    out: dict[str, str] = {}
    for term in vocab:
        norm = normalize_caption(term)
        if not norm:
            raise ValueError(f"empty vocabulary term {term!r}")
        out[norm.replace(" ", "_")] = norm
    return out


def _words(caption: str, terms: Iterable[str]) -> list[str]:
    text = normalize_caption(caption)
    for term in sorted(terms, key=len, reverse=True):
        if " " in term:
            text = re.sub(rf"\b{re.escape(term)}\b", term.replace(" ", "_"), text)
    return text.split()


def extract_attribute_pairs(
    caption: str, colours: Iterable[str], shapes: Iterable[str], max_gap: int = 1
) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names.

    A shape word (the name, or its plural with "s" / "es") is paired with the nearest colour word before
    it, with at most ``max_gap`` other words in between ("red circle", "red small circle" with
    ``max_gap=1``) and no other shape word in between. Shapes without such a colour name no pair.
    Matching is on normalised text (lower-case, punctuation removed); multi-word terms are allowed.

    Returns:
        The set of normalised ``(colour, shape)`` pairs.
    """
    colour_words = _vocab_words(colours)
    shape_words = _vocab_words(shapes)
    plural = {}
    for word, term in shape_words.items():
        plural.update({word: term, word + "s": term, word + "es": term})
    words = _words(caption, [*colour_words.values(), *shape_words.values()])
    pairs: set[tuple[str, str]] = set()
    for j, word in enumerate(words):
        shape = plural.get(word)
        if shape is None:
            continue
        for i in range(j - 1, max(-1, j - 2 - max_gap), -1):
            if words[i] in plural:
                break
            if words[i] in colour_words:
                pairs.add((colour_words[words[i]], shape))
                break
    return pairs


def _as_pair(obj: Any) -> tuple[str, str]:
    if isinstance(obj, Mapping):
        colour = obj.get("colour", obj.get("color"))
        shape = obj.get("shape")
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        colour, shape = obj
    else:
        colour = getattr(obj, "colour", getattr(obj, "color", None))
        shape = getattr(obj, "shape", None)
    if not isinstance(colour, str) or not isinstance(shape, str):
        raise TypeError(
            f"an object must be a (colour, shape) pair, a mapping or an object with colour/color and shape "
            f"strings, got {obj!r}"
        )
    return normalize_caption(colour), normalize_caption(shape)


def _as_objects(item: Any) -> list[tuple[str, str]]:
    # One object per image may be given directly: ("red", "circle") or {"colour": ..., "shape": ...}.
    if isinstance(item, Mapping) or (
        isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(v, str) for v in item)
    ):
        return [_as_pair(item)]
    if hasattr(item, "shape") and not isinstance(item, (tuple, list)):
        return [_as_pair(item)]
    return [_as_pair(o) for o in item]


def attribute_matches(
    generated: Sequence[str],
    objects: Sequence[Any],
    colours: Iterable[str],
    shapes: Iterable[str],
    mode: str = "all",
    max_gap: int = 1,
) -> list[bool]:
    """Per image, whether its caption names the right colour and shape of its objects.

    The pairs a caption names come from :func:`extract_attribute_pairs`; an image's objects are compared
    as a set of ``(colour, shape)`` pairs (two red circles count as one pair):

    - ``"all"``: every object's pair is named (other named pairs are allowed);
    - ``"any"``: at least one object's pair is named;
    - ``"exact"``: the named pairs are exactly the objects' pairs (nothing missing, nothing invented).

    An image without objects is correct when its caption names no pair, in every mode.

    Args:
        generated: N captions.
        objects: N entries, each a list of objects or a single object; an object is a ``(colour, shape)``
            pair, a mapping with ``colour`` (or ``color``) and ``shape``, or an object with such attributes.
        colours: the colour vocabulary (e.g. red, green, blue, yellow, purple, orange).
        shapes: the shape vocabulary (e.g. circle, square, triangle, star, diamond).
        mode: ``"all"``, ``"any"`` or ``"exact"``.
        max_gap: words allowed between a colour and its shape.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(_MODES)}")
    if isinstance(generated, str):
        raise TypeError("generated must be a list of captions, one per image")
    if len(generated) != len(objects):
        raise ValueError(f"{len(generated)} captions but {len(objects)} object lists")
    colours, shapes = list(colours), list(shapes)
    out = []
    for caption, item in zip(generated, objects, strict=True):
        truth = set(_as_objects(item))
        named = extract_attribute_pairs(caption, colours, shapes, max_gap=max_gap)
        if not truth:
            out.append(not named)
        elif mode == "all":
            out.append(truth <= named)
        elif mode == "any":
            out.append(bool(truth & named))
        else:
            out.append(truth == named)
    return out


def attribute_accuracy(
    generated: Sequence[str],
    objects: Sequence[Any],
    colours: Iterable[str],
    shapes: Iterable[str],
    mode: str = "all",
    max_gap: int = 1,
) -> float:
    """Fraction of images whose caption names their objects' colours and shapes.

    See :func:`attribute_matches` for the definition and the arguments. Returns 0.0 for no images.
    """
    matches = attribute_matches(generated, objects, colours, shapes, mode=mode, max_gap=max_gap)
    return sum(matches) / len(matches) if matches else 0.0
