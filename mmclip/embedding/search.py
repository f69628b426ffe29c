"""Top-k search over an embedding store (``mmclip embed``): exact chunked matmul, or a FAISS index.

The exact search streams the store in blocks of ``chunk_size`` rows (across shard boundaries), scores
every block against all queries with one matmul in float32, and keeps a running top-k, so memory is
``O(chunk_size x (D + Q))`` whatever the store's size. Results are ordered by score, ties by row.
Scores are inner products of L2-normalised vectors (cosine similarities).

FAISS is optional (``pip install faiss-cpu``): :func:`build_faiss_index` adds the store to an
inner-product index (exact ``"Flat"`` by default, or any ``faiss.index_factory`` string), and
:func:`search` uses it when given one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmclip.embedding.writer import EmbeddingStore, embed_inputs

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SearchHit",
    "TopK",
    "build_faiss_index",
    "embed_query",
    "exact_topk",
    "faiss_available",
    "faiss_topk",
    "load_faiss_index",
    "search",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 65_536


@dataclass(frozen=True)
class SearchHit:
    """One result.

    Attributes:
        rank: 0 for the best hit.
        score: cosine similarity.
        row: row in the store (all shards concatenated).
        index: position of the sample in the embedded source.
        id: the sample's id (relative path, sample key, row index or line number).
        caption: its (first) caption, or None.
        label: its class id, or None.
    """

    rank: int
    score: float
    row: int
    index: int
    id: str
    caption: str | None = None
    label: int | None = None


@dataclass
class TopK:
    """Scores ``(Q, k)`` float32 and store rows ``(Q, k)`` int64, best first (``k`` capped at the store size)."""

    scores: np.ndarray
    rows: np.ndarray


def _queries(queries: Any, dim: int) -> torch.Tensor:
    q = torch.as_tensor(
        np.asarray(queries.detach().cpu() if torch.is_tensor(queries) else queries, np.float32)
    )
    q = q[None] if q.ndim == 1 else q  # (Q, D)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}) or ({dim},), got {tuple(q.shape)}")
    return q


def exact_topk(
    store: EmbeddingStore,
    queries: Any,
    k: int = 10,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device | None = None,
) -> TopK:
    """Exact top-``k`` rows of ``store`` for each query by inner product.

    Args:
        store: the embedding store.
        queries: ``(Q, D)`` or ``(D,)`` query embeddings (normalise them for cosine scores).
        k: results per query.
        chunk_size: store rows scored at a time (bounds memory).
        device: where to compute (default CPU).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    q = _queries(queries, store.dim).to(dev)  # (Q, D)
    best_s = torch.empty(q.shape[0], 0, device=dev)  # (Q, k')
    best_r = torch.empty(q.shape[0], 0, dtype=torch.long, device=dev)  # (Q, k')
    for first, block in store.iter_chunks(chunk_size):
        x = torch.from_numpy(block).to(dev, torch.float32)  # (c, D)
        scores = q @ x.T  # (Q, c)
        kc = min(k, x.shape[0])
        s, i = scores.topk(kc, dim=1)  # (Q, kc)
        if bool(((scores >= s[:, -1:]).sum(dim=1) > kc).any()):
            # a tie straddles the cut and topk picks among tied rows arbitrarily: keep the lowest rows
            s, i = (t[:, :kc] for t in scores.sort(dim=1, descending=True, stable=True))
        cand_s = torch.cat([best_s, s], dim=1)  # (Q, k' + kc)
        cand_r = torch.cat([best_r, i + first], dim=1)
        # order by row, then stably by score: ties keep the lower row first
        by_row = cand_r.argsort(dim=1)
        cand_s, cand_r = cand_s.gather(1, by_row), cand_r.gather(1, by_row)
        by_score = cand_s.sort(dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_r = cand_s.gather(1, by_score), cand_r.gather(1, by_score)
    return TopK(scores=best_s.cpu().numpy(), rows=best_r.cpu().numpy())


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "FAISS is not installed: `pip install faiss-cpu` (or faiss-gpu), or search without it"
        ) from err
    return faiss


def build_faiss_index(
    store: EmbeddingStore,
    factory: str = "Flat",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    train_size: int = 262_144,
) -> Any:
    """A FAISS inner-product index holding every row of ``store`` (row ``r`` has FAISS id ``r``).

    Args:
        store: the embedding store.
        factory: a ``faiss.index_factory`` string; "Flat" is exact, e.g. "IVF4096,PQ64" approximate.
        chunk_size: rows added at a time.
        train_size: rows (the first ones) used to train indexes that need training.
    """
    faiss = _faiss()
    index = faiss.index_factory(store.dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = []
        taken = 0
        for _, block in store.iter_chunks(chunk_size):
            sample.append(block.astype(np.float32))
            taken += len(block)
            if taken >= train_size:
                break
        index.train(np.concatenate(sample)[:train_size])
    for _, block in store.iter_chunks(chunk_size):
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index


def load_faiss_index(path: str | os.PathLike[str]) -> Any:
    return _faiss().read_index(str(path))


def save_faiss_index(index: Any, path: str | os.PathLike[str]) -> Path:
    _faiss().write_index(index, str(path))
    return Path(path)


def faiss_topk(index: Any, queries: Any, k: int = 10) -> TopK:
    """Top-``k`` of a FAISS index built by :func:`build_faiss_index`."""
    q = _queries(queries, index.d).numpy()
    scores, rows = index.search(np.ascontiguousarray(q), min(k, index.ntotal))
    return TopK(scores=scores.astype(np.float32), rows=rows.astype(np.int64))


def search(
    store: EmbeddingStore,
    queries: Any,
    k: int = 10,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device | None = None,
    index: Any = None,
) -> list[list[SearchHit]]:
    """The top-``k`` hits of each query, with their ids, captions and labels.

    Args:
        store: the embedding store.
        queries: ``(Q, D)`` or ``(D,)`` normalised query embeddings (see :func:`embed_query`).
        k: hits per query.
        chunk_size: exact search block size.
        device: exact search device.
        index: a FAISS index of the store (:func:`build_faiss_index`); None searches exactly.
    """
    top = (
        faiss_topk(index, queries, k)
        if index is not None
        else exact_topk(store, queries, k, chunk_size, device)
    )
    valid = top.rows >= 0  # FAISS pads with -1 when it finds fewer
    wanted = sorted({int(r) for r in top.rows[valid]})
    columns = [c for c in ("index", "id", "caption", "label") if c in store.columns]
    records = dict(zip(wanted, store.rows(wanted, columns), strict=True)) if wanted else {}
    out = []
    for q in range(top.rows.shape[0]):
        hits = []
        for rank, (score, row) in enumerate(zip(top.scores[q], top.rows[q], strict=True)):
            if row < 0:
                continue
            rec = records[int(row)]
            hits.append(
                SearchHit(
                    rank=rank,
                    score=float(score),
                    row=int(row),
                    index=int(rec["index"]),
                    id=str(rec["id"]),
                    caption=rec.get("caption"),
                    label=rec.get("label"),
                )
            )
        out.append(hits)
    return out


def embed_query(
    model: torch.nn.Module,
    tokenizer: Any = None,
    text: str | list[str] | None = None,
    image: Any = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """``(Q, D)`` float32 normalised embeddings of texts or images (paths, bytes or PIL images), in fp32.

    Images are prepared with the model's evaluation transform, as ``mmclip embed`` prepares them.
    """
    from mmclip.data.naflex import collate_images
    from mmclip.data.quality import decode_image
    from mmclip.data.transforms import image_transform

    if (text is None) == (image is None):
        raise ValueError("give either text or image")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            if text is not None:
                texts = [text] if isinstance(text, str) else list(text)
                if tokenizer is None:
                    raise ValueError("text queries need the model's tokenizer")
                return embed_inputs(model, tokenizer(texts).to(dev), "text")  # (Q, D)
            images = image if isinstance(image, (list, tuple)) else [image]
            transform = image_transform(model.data_config, train=False)
            x = collate_images([transform(decode_image(im)) for im in images]).to(dev)  # (Q, 3, H, W) or NaFlex
            return embed_inputs(model, x, "image")  # (Q, D)
    finally:
        for m, training in flags:
            m.training = training
