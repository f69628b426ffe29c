"""Retrieval recall@k against a plain loop (ties, several captions per image, odd chunk sizes), a
hand-checked case, and OpenCLIP's ``get_clip_metrics`` on 1:1 pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmclip.metrics import RetrievalMetric, retrieval_metrics, retrieval_ranks

KS = (1, 2, 5, 10)


def loop_ranks(images: torch.Tensor, texts: torch.Tensor, t2i: list[int]) -> tuple[list[int], list[int]]:
    """Plain reference: rank = negatives scoring strictly above the best positive (full matrix)."""
    S = (images.double() @ texts.double().T).tolist()
    n, t = len(S), len(t2i)
    i2t = []
    for i in range(n):
        pos = [j for j in range(t) if t2i[j] == i]
        if not pos:
            continue
        best = max(S[i][j] for j in pos)
        i2t.append(sum(1 for j in range(t) if t2i[j] != i and S[i][j] > best))
    t2i_ranks = []
    for j in range(t):
        p = S[t2i[j]][j]
        t2i_ranks.append(sum(1 for i in range(n) if i != t2i[j] and S[i][j] > p))
    return i2t, t2i_ranks


def loop_metrics(images, texts, t2i: list[int], ks=KS) -> dict[str, float]:
    out = {}
    n = images.shape[0]
    firsts = {}
    for j, i in enumerate(t2i):
        firsts.setdefault(i, j)
    rows = sorted(firsts)
    pairs = (images[rows], texts[[firsts[i] for i in rows]], list(range(len(rows))))
    for prefix, (im, tx, idx) in (("", (images, texts, t2i)), ("paired_", pairs)):
        for name, r in zip(("i2t", "t2i"), loop_ranks(im, tx, idx), strict=True):
            for k in ks:
                out[f"{prefix}{name}_R@{k}"] = sum(x < k for x in r) / len(r)
            out[f"{prefix}{name}_mean_rank"] = sum(r) / len(r) + 1
            out[f"{prefix}{name}_median_rank"] = math.floor(float(np.median(r))) + 1
    assert n >= len(rows)
    return out


def random_problem(n: int, captions: tuple[int, int], dim: int, seed: int, values: int = 2, orphans: int = 0):
    """Integer-valued embeddings in [-values, values] (exact ties), 1..k captions per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(-values, values + 1, (n, dim), generator=g).float()
    counts = torch.randint(captions[0], captions[1] + 1, (n,), generator=g)
    counts[:orphans] = 0  # images without captions (candidates only)
    t2i = torch.repeat_interleave(torch.arange(n), counts)
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]  # captions in any order
    texts = torch.randint(-values, values + 1, (t2i.numel(), dim), generator=g).float()
    return images, texts, t2i


def test_hand_checked_case() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [2.0, 2.0]])
    t2i = torch.tensor([0, 0, 1, 2])
    # S = images @ texts.T = [[1,0,0,2],[0,2,1,2],[1,2,1,4]]
    ranks = retrieval_ranks(images, texts, t2i, chunk_size=2)
    assert ranks.image_to_text.tolist() == [1, 2, 0]  # i0: best pos 1, t3=2 above; i1: t1, t3 above
    assert ranks.text_to_image.tolist() == [0, 2, 0, 0]  # t0 and t2 tie with a negative: not counted
    m = retrieval_metrics(images, texts, t2i, ks=(1, 2, 5), chunk_size=2)
    expected = {
        "i2t_R@1": 1 / 3, "i2t_R@2": 2 / 3, "i2t_R@5": 1.0, "i2t_mean_rank": 2.0, "i2t_median_rank": 2.0,
        "t2i_R@1": 3 / 4, "t2i_R@2": 3 / 4, "t2i_R@5": 1.0, "t2i_mean_rank": 1.5, "t2i_median_rank": 1.0,
        # paired: first captions t0, t2, t3 -> [[1,0,2],[0,1,2],[1,1,4]]
        "paired_i2t_R@1": 1 / 3, "paired_i2t_R@2": 1.0, "paired_i2t_mean_rank": 5 / 3,
        "paired_i2t_median_rank": 2.0, "paired_t2i_R@1": 1.0, "paired_t2i_mean_rank": 1.0,
        "paired_t2i_median_rank": 1.0,
    }  # fmt: skip
    for k, v in expected.items():
        assert m[k] == pytest.approx(v), k


@pytest.mark.parametrize(
    ("n", "captions", "dim", "chunk", "orphans", "seed"),
    [
        (17, (1, 5), 4, 5, 0, 0),
        (30, (1, 3), 3, 7, 2, 1),
        (23, (5, 5), 6, 4, 0, 2),
        (9, (1, 1), 2, 4, 0, 3),
        (12, (0, 4), 3, 1, 1, 4),
        (40, (1, 6), 8, 64, 3, 5),
    ],
)
def test_matches_plain_loop_with_ties(n, captions, dim, chunk, orphans, seed) -> None:
    images, texts, t2i = random_problem(n, captions, dim, seed, orphans=orphans)
    S = images @ texts.T
    assert (S.unsqueeze(-1) == S.unsqueeze(-2)).sum() > S.numel()  # the data has exact ties
    got = retrieval_metrics(images, texts, t2i, ks=KS, chunk_size=chunk)
    want = loop_metrics(images, texts, t2i.tolist())
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_float_embeddings_match_plain_loop() -> None:
    g = torch.Generator().manual_seed(7)
    images = torch.nn.functional.normalize(torch.randn(25, 16, generator=g, dtype=torch.float64), dim=-1)
    t2i = torch.randint(0, 25, (60,), generator=g)
    texts = torch.nn.functional.normalize(
        images[t2i] + torch.randn(60, 16, generator=g, dtype=torch.float64), dim=-1
    )
    got = retrieval_metrics(images, texts, t2i, chunk_size=6)
    want = loop_metrics(images, texts, t2i.tolist(), ks=(1, 5, 10))
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_one_caption_per_image_matches_openclip() -> None:
    get_clip_metrics = pytest.importorskip("open_clip_train.train").get_clip_metrics
    g = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(50, 8, generator=g), dim=-1)
    ref = get_clip_metrics(images, texts, logit_scale=1.0)
    got = retrieval_metrics(images, texts, torch.arange(50), chunk_size=7)
    for ours, theirs in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
        for suffix in ("R@1", "R@5", "R@10", "mean_rank", "median_rank"):
            assert got[f"{ours}_{suffix}"] == pytest.approx(float(ref[f"{theirs}_{suffix}"])), (ours, suffix)
            assert got[f"paired_{ours}_{suffix}"] == got[f"{ours}_{suffix}"]


def test_metric_batches_duplicates_and_order_do_not_matter() -> None:
    images, texts, t2i = random_problem(21, (1, 4), 4, seed=11)
    want = retrieval_metrics(images, texts, t2i, ks=KS, chunk_size=5)
    ids = torch.arange(21) * 7 + 3  # arbitrary global ids, increasing with the row
    # feed images in a shuffled order, in batches, some twice; captions follow their images
    order = torch.randperm(21, generator=torch.Generator().manual_seed(0)).tolist()
    order += order[:5]
    metric = RetrievalMetric(ks=KS, chunk_size=4)
    for start in range(0, len(order), 4):
        rows = order[start : start + 4]
        caps = [j for r in rows for j in range(t2i.numel()) if t2i[j] == r]
        metric.update(images[rows], ids[rows], texts[caps], ids[t2i[caps]])
    got = metric.compute()
    for k in want:
        assert float(got[k]) == pytest.approx(want[k], abs=1e-12), k


def test_metric_text_ids_and_split_captions() -> None:
    images, texts, t2i = random_problem(10, (2, 3), 3, seed=5)
    want = retrieval_metrics(images, texts, t2i, ks=KS, chunk_size=3)
    metric = RetrievalMetric(ks=KS, chunk_size=3)
    metric.update(images, torch.arange(10), texts[:0], torch.zeros(0, dtype=torch.long))
    # captions arrive in two calls, one image's captions split between them: explicit caption ids
    half = t2i.numel() // 2
    for part in (slice(0, half), slice(half, None)):
        metric.update(
            images[:0],
            torch.zeros(0, dtype=torch.long),
            texts[part],
            t2i[part],
            torch.arange(t2i.numel())[part],
        )
    got = metric.compute()  # an image's first caption = its smallest caption id = first in t2i order
    for k in want:
        assert float(got[k]) == pytest.approx(want[k], abs=1e-12), k


def test_swar_counters_are_exact_past_a_byte() -> None:
    from mmclip.metrics.retrieval import _count_columns, _count_rows

    g = torch.Generator().manual_seed(0)
    for fill in (None, True):  # random masks, and all-True (every byte lane at its limit)
        mask = torch.ones(600, 4080, dtype=torch.bool) if fill else torch.rand(600, 4080, generator=g) > 0.3
        assert torch.equal(_count_columns(mask), mask.sum(0))
        assert torch.equal(_count_rows(mask), mask.sum(1))


def test_errors() -> None:
    metric = RetrievalMetric()
    metric.update(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(1, 3), torch.tensor([5]))
    with pytest.raises(ValueError, match="never added"):
        metric.compute()
    with pytest.raises(ValueError, match="non-negative"):
        RetrievalMetric().update(torch.zeros(1, 3), torch.tensor([-1]), torch.zeros(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        RetrievalMetric().update(torch.zeros(1, 3), torch.tensor([0]), torch.zeros(1, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least one image"):
        retrieval_metrics(torch.zeros(0, 3), torch.zeros(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="ks"):
        RetrievalMetric(ks=(0,))
