"""Caption metrics: BLEU-4 / ROUGE-L through torchmetrics and attribute accuracy on hand-made captions."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from mmclip.metrics.captioning import (
    CaptionMetrics,
    attribute_accuracy,
    attribute_matches,
    caption_scores,
    extract_attribute_pairs,
    normalize_caption,
)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "light blue"]
SHAPES = ["circle", "square", "triangle", "star", "diamond"]


def test_identical_hypothesis_and_reference_score_one():
    hyps = ["a red circle next to a blue square", "A green star on the left."]
    refs = [["a red circle next to a blue square", "two shapes"], ["a green star on the left", "a star"]]
    scores = caption_scores(hyps, refs)
    assert scores == pytest.approx({"bleu4": 1.0, "rougeL": 1.0})


def test_bleu4_matches_closed_form():
    # corpus BLEU-4 with one sentence: brevity penalty x geometric mean of clipped n-gram precisions
    hyp = "a red circle on the left of the mat"
    ref = "a red circle is on the left of the mat"
    h, r = hyp.split(), ref.split()
    precisions = []
    for n in range(1, 5):
        hn = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
        rn = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
        precisions.append(sum((hn & rn).values()) / sum(hn.values()))
    assert precisions == pytest.approx([1, 7 / 8, 5 / 7, 3 / 6])
    bp = math.exp(1 - len(r) / len(h))
    expected = bp * math.exp(sum(math.log(p) for p in precisions) / 4)
    assert caption_scores([hyp], [[ref]])["bleu4"] == pytest.approx(expected, rel=1e-5)


def test_rouge_l_uses_best_reference_and_lcs():
    # LCS("a red circle", "a big red circle") = 3: P = 1, R = 3/4, F = 2PR / (P + R) = 6/7
    scores = caption_scores(["a red circle"], [["blue star", "a big red circle"]])
    assert scores["rougeL"] == pytest.approx(6 / 7, rel=1e-5)


def test_caption_metrics_accumulates_and_resets():
    metrics = CaptionMetrics()
    metrics.update(["a red circle"], [["a red circle"]])
    metrics.update(["blue star"], [["a green square"]])
    out = metrics.compute()
    assert set(out) == {"bleu4", "rougeL"}
    assert float(out["rougeL"]) == pytest.approx(0.5)  # mean of 1 and 0
    metrics.reset()
    metrics.update(["the blue star"], [["the blue star"]])
    assert float(metrics.compute()["rougeL"]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.update(["a"], [["a"], ["b"]])


def test_normalize_caption():
    assert normalize_caption("  A Red,  circle!\n") == "a red circle"


def test_extract_attribute_pairs():
    pairs = extract_attribute_pairs("A red circle and two blue squares.", COLOURS, SHAPES)
    assert pairs == {("red", "circle"), ("blue", "square")}
    # one word between colour and shape is allowed by default, not two
    assert extract_attribute_pairs("a red small star", COLOURS, SHAPES) == {("red", "star")}
    assert extract_attribute_pairs("a red very small star", COLOURS, SHAPES) == set()
    assert extract_attribute_pairs("a red very small star", COLOURS, SHAPES, max_gap=2) == {("red", "star")}
    # a colour does not jump over another shape; a shape with no colour names no pair
    assert extract_attribute_pairs("red circle square", COLOURS, SHAPES) == {("red", "circle")}
    # multi-word colours win over their last word
    assert extract_attribute_pairs("a light blue diamond", COLOURS, SHAPES) == {("light blue", "diamond")}
    # colour after the shape is not read
    assert extract_attribute_pairs("a circle that is red", COLOURS, SHAPES) == set()


def test_attribute_accuracy_modes():
    captions = [
        "a red circle and a blue square",  # both objects named
        "a red circle",  # one of two
        "a green circle",  # wrong colour
        "a yellow star and an orange diamond",  # right object plus an invented one
        "nothing here",  # no objects, no pairs
    ]
    objects = [
        [("red", "circle"), ("blue", "square")],
        [("red", "circle"), ("blue", "square")],
        [{"colour": "red", "shape": "circle"}],
        ("Yellow", "Star"),  # a single object may be given directly
        [],
    ]
    assert attribute_matches(captions, objects, COLOURS, SHAPES, mode="all") == [
        True,
        False,
        False,
        True,
        True,
    ]
    assert attribute_matches(captions, objects, COLOURS, SHAPES, mode="any") == [
        True,
        True,
        False,
        True,
        True,
    ]
    assert attribute_matches(captions, objects, COLOURS, SHAPES, mode="exact") == [
        True,
        False,
        False,
        False,
        True,
    ]
    assert attribute_accuracy(captions, objects, COLOURS, SHAPES) == pytest.approx(3 / 5)
    assert attribute_accuracy(captions, objects, COLOURS, SHAPES, mode="exact") == pytest.approx(2 / 5)
    assert attribute_accuracy([], [], COLOURS, SHAPES) == 0.0


def test_attribute_accuracy_accepts_objects_with_attributes():
    class Obj:
        def __init__(self, color, shape):
            self.color, self.shape = color, shape

    captions = ["purple triangle", "purple square"]
    objects = [[Obj("purple", "triangle")], [Obj("purple", "triangle")]]
    assert attribute_accuracy(captions, objects, COLOURS, SHAPES) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mode"):
        attribute_accuracy(captions, objects, COLOURS, SHAPES, mode="most")
    with pytest.raises(ValueError, match="captions"):
        attribute_accuracy(captions[:1], objects, COLOURS, SHAPES)
