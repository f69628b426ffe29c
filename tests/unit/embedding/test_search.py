"""Top-k search over a store: exact against a brute-force numpy argsort, hits carry ids, optional FAISS."""

from __future__ import annotations

import numpy as np
import pytest

from mmclip.embedding.search import SearchHit, build_faiss_index, exact_topk, faiss_available, search
from mmclip.embedding.writer import EmbeddingStore, write_embeddings

N, D, SHARD = 1037, 16, 100


def _brute_force(store: EmbeddingStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ store.embeddings(np.float64).T  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: lower row first
    return np.take_along_axis(scores, order, 1), order


@pytest.fixture(scope="module")
def dyadic(tmp_path_factory):
    """Integer vectors / 16: float16-exact entries and exact float32 dot products, so scores tie often
    and every implementation computes the same numbers; the order is then fully determined."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (N, D)) / 16
    store = write_embeddings(
        tmp_path_factory.mktemp("dyadic"), x, [f"s{i}" for i in range(N)], shard_size=SHARD, normalize=False
    )
    queries = rng.integers(-3, 4, (5, D)) / 16
    return store, queries


@pytest.mark.parametrize("chunk_size", [1, 64, 333, 4096])
@pytest.mark.parametrize("k", [1, 7, 150, N + 5])  # 150 > shard size; N + 5 > the store
def test_exact_topk_equals_brute_force_argsort(dyadic, chunk_size, k):
    store, queries = dyadic
    top = exact_topk(store, queries, k=k, chunk_size=chunk_size)
    ref_scores, ref_rows = _brute_force(store, queries, k)
    assert top.rows.shape == (5, min(k, N))
    np.testing.assert_array_equal(top.rows, ref_rows)
    np.testing.assert_array_equal(top.scores, ref_scores.astype(np.float32))


@pytest.mark.parametrize("chunk_size", [3, 10, 64])
def test_ties_keep_the_lowest_rows(tmp_path, chunk_size):
    x = np.ones((50, 4))
    x[[7, 30]] = [1, 1, 1, 2]  # two better rows; the other 48 tie
    store = write_embeddings(tmp_path, x, [str(i) for i in range(50)], shard_size=20, normalize=False)
    top = exact_topk(store, np.ones(4), k=6, chunk_size=chunk_size)
    assert top.rows.tolist() == [[7, 30, 0, 1, 2, 3]]
    assert top.scores.tolist() == [[5.0, 5.0, 4.0, 4.0, 4.0, 4.0]]


def test_exact_topk_on_random_unit_vectors(tmp_path):
    rng = np.random.default_rng(1)
    store = write_embeddings(
        tmp_path, rng.standard_normal((N, 64)), [str(i) for i in range(N)], shard_size=SHARD
    )
    queries = rng.standard_normal((8, 64))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    top = exact_topk(store, queries, k=20, chunk_size=257)
    ref_scores, ref_rows = _brute_force(store, queries, 20)
    np.testing.assert_array_equal(top.rows, ref_rows)
    np.testing.assert_allclose(top.scores, ref_scores, atol=1e-6, rtol=0)


def test_exact_search_streams_the_store(dyadic, monkeypatch):
    store, queries = dyadic
    seen = []
    chunks = store.iter_chunks

    def spy(chunk_size):
        for first, block in chunks(chunk_size):
            seen.append(len(block))
            yield first, block

    monkeypatch.setattr(store, "iter_chunks", spy)
    monkeypatch.setattr(
        store, "embeddings", lambda *a: pytest.fail("exact search must not load the whole store")
    )
    exact_topk(store, queries, k=3, chunk_size=64)
    assert max(seen) == 64 and sum(seen) == N


def test_search_hits_carry_ids_captions_labels(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 8))
    index = [i * 2 + 1 for i in range(30)]  # source positions with gaps (skipped samples)
    captions = [[f"caption {i}", f"other {i}"] if i % 4 else None for i in range(30)]
    store = write_embeddings(
        tmp_path,
        x,
        [f"img/{i}.jpg" for i in range(30)],
        index=index,
        captions=captions,
        labels=[i % 3 for i in range(30)],
        shard_size=7,
    )
    q = x[[12, 13]] / np.linalg.norm(x[[12, 13]], axis=1, keepdims=True)
    hits = search(store, q, k=3, chunk_size=5)
    assert [len(h) for h in hits] == [3, 3]
    best = hits[0][0]
    assert best == SearchHit(
        rank=0, score=best.score, row=12, index=25, id="img/12.jpg", caption=None, label=0
    )
    assert best.score == pytest.approx(1.0, abs=1e-3)
    assert hits[1][0].caption == "caption 13" and hits[1][0].label == 1 and hits[1][0].index == 27
    assert [h.rank for h in hits[1]] == [0, 1, 2] and hits[1][0].score >= hits[1][1].score >= hits[1][2].score
    single = search(store, x[5], k=1)  # a (D,) query
    assert single[0][0].id == "img/5.jpg"


def test_bad_arguments(dyadic):
    store, queries = dyadic
    with pytest.raises(ValueError, match="k must be >= 1"):
        exact_topk(store, queries, k=0)
    with pytest.raises(ValueError, match=r"queries must be \(Q, 16\)"):
        exact_topk(store, np.zeros((2, 5)), k=1)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)")
def test_faiss_flat_index_equals_exact_search(dyadic):
    store, queries = dyadic
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, D)).astype(np.float32)
    index = build_faiss_index(store)
    assert index.ntotal == N
    q = x[:4] / np.linalg.norm(x[:4], axis=1, keepdims=True)
    exact = search(store, q, k=10)
    approx = search(store, q, k=10, index=index)
    for e, a in zip(exact, approx, strict=True):
        assert [h.score for h in a] == pytest.approx([h.score for h in e], abs=1e-5)
