"""Embedding a corpus and searching it: sources -> store writer (one process or Lightning's predict loop)
-> embedding store -> exact or FAISS top-k search, and the cached-embedding data module that trains a text
tower against a stored image tower (LiT from a cache). ``mmclip embed`` and ``mmclip search`` only parse
arguments and call these.

Everything loads on first use (``mmclip.embedding.EmbeddingStore`` imports only the store).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EmbedSource": "mmclip.embedding.sources",
    "build_source": "mmclip.embedding.sources",
    "EmbeddingStore": "mmclip.embedding.store",
    "StoreMismatchError": "mmclip.embedding.store",
    "write_embeddings": "mmclip.embedding.store",
    "EmbedResult": "mmclip.embedding.writer",
    "embed_corpus": "mmclip.embedding.writer",
    "embed_inputs": "mmclip.embedding.writer",
    "embed_corpus_lightning": "mmclip.embedding.predict",
    "search": "mmclip.embedding.search",
    "embed_query": "mmclip.embedding.search",
    "build_faiss_index": "mmclip.embedding.search",
    "CachedEmbeddingDataModule": "mmclip.embedding.cached",
    "EmbeddingSource": "mmclip.embedding.cached",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
