"""Zero-shot classification end to end with towers whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmclip.evaluation import evaluate
from mmclip.metrics import (
    DEFAULT_TEMPLATES,
    ZeroShotAccuracy,
    build_zeroshot_classifier,
    expand_prompts,
    subset_scores,
)

from .fakes import FakeDataModule, FakeTokenizer, Split, fake_model

NAMES = ["cat", "dog", "bird", "fish", "horse", "sea lion", "lion"]


def _datamodule(vectors: torch.Tensor, labels: torch.Tensor, tokenizer: FakeTokenizer, templates=None):
    n = vectors.shape[0]
    split = Split(vectors, [vectors[i : i + 1] for i in range(n)], labels, [f"z{i}" for i in range(n)])
    return FakeDataModule({"test": split}, NAMES, tokenizer, templates=templates, batch_size=3)


def test_default_templates() -> None:
    assert 10 <= len(DEFAULT_TEMPLATES) <= 20
    assert len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)


def test_expand_prompts_forms() -> None:
    prompts, owners = expand_prompts(["a b", "c"], ["x {}.", lambda c: f"{c}!", "{} {{literal}}"])
    assert prompts == ["x a b.", "a b!", "a b {{literal}}", "x c.", "c!", "c {{literal}}"]
    assert owners.tolist() == [0, 0, 0, 1, 1, 1]
    prompts, owners = expand_prompts(["a", "b"], {"a": ["{} one"], "b": ["{} two", "{} three"]})
    assert prompts == ["a one", "b two", "b three"] and owners.tolist() == [0, 1, 1]
    assert expand_prompts(["a"])[0] == [t.replace("{}", "a") for t in DEFAULT_TEMPLATES]
    with pytest.raises(ValueError, match=r'uses "\{\}", not "\{c\}"'):
        expand_prompts(["a"], ["a photo of {c}"])
    with pytest.raises(KeyError, match="no templates for class 'b'"):
        expand_prompts(["a", "b"], {"a": ["{}"]})
    with pytest.raises(ValueError, match="non-empty list"):
        expand_prompts(["a"], "{}")


def test_classifier_normalises_each_template_then_averages() -> None:
    dim = len(NAMES) + 2
    tok = FakeTokenizer(NAMES, dim, template_weight=3)
    templates = ["a photo of a {}.", "{}", "an image of the {} here", lambda c: f"my {c}"]
    got = build_zeroshot_classifier(fake_model(dim), tok, NAMES, templates, batch_size=3)  # cuts classes
    assert got.shape == (dim, len(NAMES))
    for i, name in enumerate(NAMES):
        prompts = [t(name) if callable(t) else t.replace("{}", name) for t in templates]
        raw = torch.stack([tok.vector(p).double() for p in prompts])  # (P, D)
        want = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=0)
        torch.testing.assert_close(got[:, i].double(), want, atol=1e-6, rtol=0)
        wrong = F.normalize(raw.mean(0), dim=0)  # averaging before normalising differs here
        assert (wrong - want).abs().max() > 1e-3


def test_one_hot_towers_give_exact_accuracy() -> None:
    dim = len(NAMES) + 2
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 5, 0, 2])
    vectors = F.one_hot(labels, dim) * 3  # image embedding = one-hot of its class
    dm = _datamodule(vectors, labels, FakeTokenizer(NAMES, dim, template_weight=1))  # "sea lion" vs "lion"
    res = evaluate(fake_model(dim), datamodule=dm, tasks=("zeroshot",), per_class=True)
    assert res["zeroshot/top1"] == 1.0 and res["zeroshot/top5"] == 1.0
    assert res["zeroshot/mean_per_class_recall"] == 1.0
    assert all(res[f"zeroshot/recall_{n}"] == 1.0 for n in NAMES)
    # the data module's own templates are used (and the default set when it has none)
    dm.templates = None
    assert evaluate(fake_model(dim), datamodule=dm, tasks=("zeroshot",))["zeroshot/top1"] == 1.0


def test_known_confusion() -> None:
    dim = len(NAMES) + 2
    e = torch.eye(dim)
    vectors = torch.stack(
        [
            e[0],  # label 0: rank 0
            2 * e[1] + e[0],  # label 0: class 1 above -> rank 1
            torch.tensor([6.0, 5, 4, 3, 2, 1, 0, 0, 0]),  # label 1: class 0 above -> rank 1
            3 * (e[0] + e[3] + e[4] + e[5] + e[6]) + e[2],  # label 2: 5 classes above -> rank 5
            e[2] + e[3],  # label 2: tie with class 3 -> rank 0 (ties count for the sample)
            e[3],  # label 3: rank 0
        ]
    )
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    dm = _datamodule(vectors, labels, FakeTokenizer(NAMES, dim))
    res = evaluate(
        fake_model(dim), datamodule=dm, tasks=("zeroshot",), class_subsets={"held": ["bird", 3], "none": [6]}
    )
    assert res["zeroshot/top1"] == pytest.approx(3 / 6)
    assert res["zeroshot/top5"] == pytest.approx(5 / 6)
    # per-class recall: class 0: 1/2, class 1: 0, class 2: 1/2, class 3: 1 (classes 4-6 have no samples)
    assert res["zeroshot/mean_per_class_recall"] == pytest.approx((0.5 + 0 + 0.5 + 1) / 4)
    assert res["zeroshot/held_top1"] == pytest.approx(2 / 3)  # samples of classes 2 and 3
    assert res["zeroshot/held_mean_per_class_recall"] == pytest.approx(0.75)
    assert math.isnan(res["zeroshot/none_top1"])


def test_metric_ignores_unknown_labels_and_dedupes_ids() -> None:
    metric = ZeroShotAccuracy(num_classes=3, topk=(1, 2))
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 2, 1], [1, 1, 1]])
    metric.update(logits, torch.tensor([0, 2, 2, -1]), torch.tensor([10, 11, 11, 12]))  # 11 twice
    metric.update(logits[:1], torch.tensor([1]))  # no id: never deduplicated
    res = metric.compute()
    assert float(res["top1"]) == pytest.approx(1 / 3)  # samples 10 (rank 0), 11 (rank 1), no-id (rank 1)
    assert float(res["top2"]) == 1.0  # both misses have rank 1
    assert res["per_class_count"].tolist() == [1, 1, 1]
    assert subset_scores(res["per_class_recall"], res["per_class_count"], [0, 1]) == {
        "top1": 0.5,
        "mean_per_class_recall": 0.5,
    }
    with pytest.raises(ValueError, match="out of range"):
        metric.update(logits[:1], torch.tensor([3]))
