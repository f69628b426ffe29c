"""``mmclip search OUT --text "a red circle" | --image PATH [-k 5] [--faiss] [--json]``: top-k over a store.

The query is embedded by the model the store was written with (rebuilt from ``OUT/meta.json``), or read
from ``--embedding FILE.npy`` (``(D,)`` or ``(Q, D)``). Results print as a table, or as JSON lines
(``--json``: one object per hit with ``query``, ``rank``, ``score``, ``id``, ``index``, ``row``,
``caption``, ``label``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmclip search", description=__doc__.split("\n")[0])
    p.add_argument("store", help="an embedding store folder written by `mmclip embed`")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", action="append", help="a text query (repeat for several)")
    q.add_argument("--image", action="append", help="an image file query (repeat for several)")
    q.add_argument("--embedding", help="a .npy file of query embeddings, (D,) or (Q, D)")
    p.add_argument("-k", type=int, default=5, help="hits per query (default 5)")
    p.add_argument(
        "--faiss", action="store_true", help="search a FAISS index (OUT/faiss.index, built if missing)"
    )
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--device", default="cpu", help="where to embed the query and search (default cpu)")
    p.add_argument("--chunk-size", type=int, default=None, help="store rows scored at a time (exact search)")
    return p


def _queries(args: argparse.Namespace, store) -> tuple[list[str], np.ndarray]:
    if args.embedding:
        q = np.load(args.embedding, allow_pickle=False).astype(np.float32)
        q = q[None] if q.ndim == 1 else q
        q /= np.linalg.norm(q, axis=1, keepdims=True).clip(min=1e-12)
        return [f"{args.embedding}[{i}]" for i in range(len(q))], q
    from mmclip.cli.embed import model_from_spec
    from mmclip.embedding.search import embed_query

    model, tokenizer = model_from_spec(store.meta["model"])
    model = model.to(args.device)
    if args.text:
        return list(args.text), embed_query(model, tokenizer, text=args.text).cpu().numpy()
    return list(args.image), embed_query(model, image=list(args.image)).cpu().numpy()


def _index(store):
    from mmclip.embedding.search import build_faiss_index, load_faiss_index, save_faiss_index

    path = Path(store.path) / "faiss.index"
    if path.exists() and path.stat().st_mtime >= max(
        p.stat().st_mtime for p in Path(store.path).glob("ids-*")
    ):
        return load_faiss_index(path)
    index = build_faiss_index(store)
    save_faiss_index(index, path)
    return index


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from mmclip.data.quality import SkipSample
    from mmclip.embedding.search import DEFAULT_CHUNK_SIZE, search
    from mmclip.embedding.writer import EmbeddingStore

    store = EmbeddingStore(args.store)
    if not store.complete:
        print(
            f"error: {len(store.missing_shards)} of {store.num_shards} shards of {args.store} are missing (an "
            "interrupted `mmclip embed`): run it again with the same arguments to finish the store",
            file=sys.stderr,
        )
        return 2
    try:
        names, queries = _queries(args, store)
    except (SkipSample, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        index = _index(store) if args.faiss else None
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = search(
        store,
        queries,
        k=args.k,
        chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
        device=args.device,
        index=index,
    )
    if args.json:
        for name, hits in zip(names, results, strict=True):
            for h in hits:
                row = {
                    "query": name,
                    "rank": h.rank,
                    "score": round(h.score, 6),
                    "id": h.id,
                    "index": h.index,
                }
                print(json.dumps({**row, "row": h.row, "caption": h.caption, "label": h.label}))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, hits in zip(names, results, strict=True):
        table = Table(title=f"{name!r}: top {len(hits)} of {len(store)} ({store.meta['modality']} store)")
        for col, justify in (
            ("#", "right"),
            ("score", "right"),
            ("id", "left"),
            ("index", "right"),
            ("caption", "left"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for h in hits:
            table.add_row(str(h.rank + 1), f"{h.score:.4f}", h.id, str(h.index), h.caption or "")
        console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
