"""The embedding store format: a folder of float16 embedding shards with parquet id tables.

A store is a folder ``OUT`` (written by ``mmclip embed``, see :mod:`mmclip.embedding.writer`):

* ``meta.json``: ``{"format": "mmclip-embeddings", "version": 1, "modality": "image" | "text", "dim": D,
  "dtype": "float16", "normalized": true, "shard_size": S, "num_samples": N, "num_shards": K,
  "precision": ..., "model": {...}, "source": {...}}``; ``model`` is the plain spec that rebuilds the model
  (the recipe's model / image_tower / text_tower nodes, ``checkpoint`` and ``seed``), ``source`` the
  source's kind, absolute path, options and content fingerprint. Written first; a resumed run must
  describe the same store (else :class:`StoreMismatchError`).
* per shard ``i`` (source positions ``[i * S, min((i + 1) * S, N))``): ``emb-{i:05d}.npy`` (float16
  ``(n_i, D)``, L2-normalised rows) and ``ids-{i:05d}.parquet`` (``index`` int64 position in the source,
  ``id`` str, and where the source has them ``caption`` str, ``captions`` list<str>, ``label`` int64).
  Both are written under a temporary name and renamed, the ids file last: a shard is done iff its ids
  file exists. Samples that cannot be decoded are left out of their shard (and counted in the log).

:class:`EmbeddingStore` reads a store; :func:`write_embeddings` writes one from arrays you already have;
:func:`prepare_store` and :func:`write_shard` are what the embedding run writes with.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FORMAT",
    "META_NAME",
    "VERSION",
    "EmbeddingStore",
    "StoreMismatchError",
    "canonical_precision",
    "emb_path",
    "ids_path",
    "ids_table",
    "prepare_store",
    "store_meta",
    "write_embeddings",
    "write_shard",
]

FORMAT = "mmclip-embeddings"
VERSION = 1
META_NAME = "meta.json"
_PRECISION_ALIASES = {
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16": "16",
    "16-mixed": "16",
    "fp16": "16",
}


class StoreMismatchError(ValueError):
    """``OUT`` already holds a store of another model, source, shard size or precision."""


def canonical_precision(precision: str | int) -> str:
    """``"32"``, ``"bf16"`` or ``"16"`` (autocast dtype) from Lightning-style names such as ``"bf16-mixed"``."""
    key = str(precision).lower()
    if key not in _PRECISION_ALIASES:
        raise ValueError(f"precision must be one of {sorted(_PRECISION_ALIASES)}, got {precision!r}")
    return _PRECISION_ALIASES[key]


def emb_path(out: str | os.PathLike[str], shard: int) -> Path:
    return Path(out) / f"emb-{shard:05d}.npy"


def ids_path(out: str | os.PathLike[str], shard: int) -> Path:
    return Path(out) / f"ids-{shard:05d}.parquet"


def _plain_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _atomic_write(path: Path, data: bytes, unique: bool = False) -> None:
    """Writes ``data`` to a temporary file next to ``path`` and renames it (``unique``: per-process temp name,
    for files several ranks may write at once)."""
    tmp = path.with_name(path.name + (f".tmp{os.getpid()}" if unique else ".tmp"))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def store_meta(
    *,
    modality: str,
    dim: int,
    shard_size: int,
    num_samples: int,
    model: dict[str, Any],
    source: dict[str, Any],
    precision: str | int = "32",
) -> dict[str, Any]:
    """The ``meta.json`` content (plain JSON types)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return _plain_json(
        {
            "format": FORMAT,
            "version": VERSION,
            "modality": modality,
            "dim": int(dim),
            "dtype": "float16",
            "normalized": True,
            "shard_size": int(shard_size),
            "num_samples": int(num_samples),
            "num_shards": math.ceil(num_samples / shard_size),
            "precision": canonical_precision(precision),
            "model": model,
            "source": source,
        }
    )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def prepare_store(
    out: str | os.PathLike[str], meta: dict[str, Any], rank: int = 0, world_size: int = 1
) -> list[int]:
    """Writes ``meta.json`` (or checks that the one there matches) and returns this rank's shards to do.

    Raises:
        StoreMismatchError: ``out`` holds another store, or shard files without a ``meta.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_file = out / META_NAME
    meta = _plain_json(meta)
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old != meta:
            diffs = _differences(old, meta)
            shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs) - 6} more)" if len(diffs) > 6 else "")
            raise StoreMismatchError(
                f"{out} already holds embeddings that differ from this run ({shown}). A run resumes only "
                f"with the same model, checkpoint, source, shard_size and precision: use another output "
                f"folder, or delete {out} to start over."
            )
    else:
        if any(out.glob("ids-*.parquet")) or any(out.glob("emb-*.npy")):
            raise StoreMismatchError(
                f"{out} holds shard files but no {META_NAME}: it is not a store this code wrote; use an empty folder"
            )
        _atomic_write(meta_file, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(), unique=True)
    return [i for i in range(meta["num_shards"]) if i % world_size == rank and not ids_path(out, i).exists()]


def _ids_schema(has_captions: bool, has_labels: bool) -> Any:
    import pyarrow as pa

    fields = [pa.field("index", pa.int64()), pa.field("id", pa.string())]
    if has_captions:
        fields += [pa.field("caption", pa.string()), pa.field("captions", pa.list_(pa.string()))]
    if has_labels:
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields)


def ids_table(
    index: Sequence[int],
    ids: Sequence[str],
    captions: Sequence[list[str] | None] | None = None,
    labels: Sequence[int | None] | None = None,
) -> Any:
    """The ids parquet table of one shard (``pyarrow.Table``)."""
    import pyarrow as pa

    columns: dict[str, Any] = {"index": list(map(int, index)), "id": [str(i) for i in ids]}
    if captions is not None:
        columns["caption"] = [c[0] if c else None for c in captions]
        columns["captions"] = [list(c) if c is not None else None for c in captions]
    if labels is not None:
        columns["label"] = [None if v is None else int(v) for v in labels]
    return pa.table(columns, schema=_ids_schema(captions is not None, labels is not None))


def _write_emb(out: str | os.PathLike[str], shard: int, embeds: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(embeds, dtype=np.float16), allow_pickle=False)
    _atomic_write(emb_path(out, shard), buf.getvalue())


def write_shard(out: str | os.PathLike[str], shard: int, embeds: np.ndarray, table: Any) -> None:
    """Writes one shard: embeddings (temp name, renamed), then its ids table (temp name, renamed)."""
    import pyarrow.parquet as pq

    if embeds.ndim != 2 or embeds.shape[0] != table.num_rows:
        raise ValueError(f"shard {shard}: {embeds.shape} embeddings for {table.num_rows} ids")
    _write_emb(out, shard, embeds)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    _atomic_write(ids_path(out, shard), sink.getvalue())


class EmbeddingStore:
    """Reads an embedding store folder (see the module docstring).

    Example::

        store = EmbeddingStore("runs/embed/embeddings")
        x = store.embeddings(np.float32)      # (N', D), every shard in order
        ids = store.ids().to_pandas()          # index, id[, caption, captions, label]
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        meta_file = self.path / META_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{self.path} is not an embedding store (no {META_NAME}); write one with `mmclip embed`"
            )
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file} is not an {FORMAT} file (format={self.meta.get('format')!r})")
        if self.meta.get("version") != VERSION:
            raise ValueError(
                f"{meta_file} has version {self.meta.get('version')}; this mmclip reads version {VERSION}"
            )
        self._rows: list[int] | None = None

    @property
    def num_shards(self) -> int:
        return int(self.meta["num_shards"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def missing_shards(self) -> list[int]:
        """Shards not written yet (an interrupted run: run ``mmclip embed`` again with the same arguments)."""
        return [i for i in range(self.num_shards) if not ids_path(self.path, i).exists()]

    @property
    def complete(self) -> bool:
        return not self.missing_shards

    def _check(self, shard: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range for {self.num_shards} shards")
        if not ids_path(self.path, shard).exists():
            raise FileNotFoundError(
                f"shard {shard} of {self.path} is not written: the run was interrupted; run `mmclip embed` "
                "again with the same arguments to finish it"
            )

    def shard_embeddings(self, shard: int, mmap: bool = True) -> np.ndarray:
        """``(n_i, D)`` float16 embeddings of one shard (memory-mapped by default)."""
        self._check(shard)
        return np.load(emb_path(self.path, shard), mmap_mode="r" if mmap else None, allow_pickle=False)

    def shard_ids(self, shard: int, columns: Sequence[str] | None = None) -> Any:
        """The ids table of one shard (``pyarrow.Table``)."""
        import pyarrow.parquet as pq

        self._check(shard)
        return pq.read_table(ids_path(self.path, shard), columns=list(columns) if columns else None)

    def shard(self, shard: int) -> tuple[np.ndarray, Any]:
        """``(embeddings (n_i, D) float16, ids table)`` of one shard."""
        return np.asarray(self.shard_embeddings(shard, mmap=False)), self.shard_ids(shard)

    @property
    def shard_rows(self) -> list[int]:
        """Rows per shard, from the parquet footers (no data read)."""
        if self._rows is None:
            import pyarrow.parquet as pq

            rows = []
            for i in range(self.num_shards):
                self._check(i)
                rows.append(pq.ParquetFile(ids_path(self.path, i)).metadata.num_rows)
            self._rows = rows
        return self._rows

    @property
    def columns(self) -> list[str]:
        """Column names of the ids tables."""
        import pyarrow.parquet as pq

        if self.num_shards == 0:
            return ["index", "id"]
        self._check(0)
        return list(pq.read_schema(ids_path(self.path, 0)).names)

    def __len__(self) -> int:
        return sum(self.shard_rows)

    def iter_chunks(self, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, (c, D) float16 block)`` over all rows in order, ``c <= chunk_size``, across shards."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        row = 0
        for i in range(self.num_shards):
            emb = self.shard_embeddings(i)
            for a in range(0, emb.shape[0], chunk_size):
                block = np.array(emb[a : a + chunk_size])  # (c, D), a writable copy of the mapped rows
                yield row + a, block
            row += emb.shape[0]

    def embeddings(self, dtype: Any = np.float16) -> np.ndarray:
        """All embeddings, shards concatenated in order: ``(N', D)`` (N' = N minus skipped samples)."""
        parts = [np.asarray(self.shard_embeddings(i), dtype=dtype) for i in range(self.num_shards)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=dtype)

    def ids(self, columns: Sequence[str] | None = None) -> Any:
        """All ids tables concatenated in order (``pyarrow.Table``), row ``r`` describing embedding ``r``."""
        import pyarrow as pa

        tables = [self.shard_ids(i, columns) for i in range(self.num_shards)]
        if not tables:
            return _ids_schema(False, False).empty_table()
        return pa.concat_tables(tables)

    def rows(self, rows: Sequence[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The ids-table records of global rows ``rows`` (reading only the shards they fall in)."""
        offsets = np.concatenate([[0], np.cumsum(self.shard_rows)])
        out: list[dict[str, Any] | None] = [None] * len(rows)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for k, r in enumerate(rows):
            if not 0 <= r < offsets[-1]:
                raise IndexError(f"row {r} out of range for {offsets[-1]} rows")
            s = int(np.searchsorted(offsets, r, side="right")) - 1
            by_shard.setdefault(s, []).append((k, int(r - offsets[s])))
        for s, items in by_shard.items():
            table = self.shard_ids(s, columns)
            picked = table.take([j for _, j in items]).to_pylist()
            for (k, _), rec in zip(items, picked, strict=True):
                out[k] = rec
        return out  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, modality={self.meta['modality']!r}, dim={self.dim}, "
            f"samples={self.meta['num_samples']}, shards={self.num_shards})"
        )


def write_embeddings(
    out: str | os.PathLike[str],
    embeddings: np.ndarray | torch.Tensor,
    ids: Sequence[str],
    *,
    index: Sequence[int] | None = None,
    captions: Sequence[list[str] | str | None] | None = None,
    labels: Sequence[int | None] | None = None,
    shard_size: int = 10_000,
    modality: str = "image",
    model: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    normalize: bool = True,
) -> EmbeddingStore:
    """Writes a store from embeddings you already have (rows in source order), e.g. to search them.

    Args:
        out: the store folder (must not hold another store).
        embeddings: ``(N, D)``; stored L2-normalised (``normalize``) as float16.
        ids: sample ids.
        index: source positions (default ``0 .. N-1``).
        captions: a caption or a list of captions per sample, or None.
        labels: class ids, or None.
        shard_size: rows per shard.
        modality: "image" or "text".
        model: the model spec for ``meta.json`` (needed by ``mmclip search`` to embed queries).
        source: the source description for ``meta.json``.
        normalize: L2-normalise the rows first.
    """
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))  # (N, D)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise ValueError(f"embeddings {tuple(x.shape)} do not match {len(ids)} ids")
    if normalize:
        x = F.normalize(x, dim=-1)
    n = x.shape[0]
    index = list(range(n)) if index is None else list(index)
    caps = None if captions is None else [[c] if isinstance(c, str) else c for c in captions]
    meta = store_meta(
        modality=modality,
        dim=x.shape[1],
        shard_size=shard_size,
        num_samples=n,
        model=model or {},
        source=source or {"kind": "arrays"},
    )
    for shard in prepare_store(out, meta):
        a, b = shard * shard_size, min((shard + 1) * shard_size, n)
        table = ids_table(
            index[a:b],
            list(ids[a:b]),
            None if caps is None else caps[a:b],
            None if labels is None else labels[a:b],
        )
        write_shard(out, shard, x[a:b].to(torch.float16).numpy(), table)
    return EmbeddingStore(out)
