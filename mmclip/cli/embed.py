"""``mmclip embed``: embeds a corpus into a resumable embedding store (a thin wrapper around :func:`embed`).

``embed(cfg)`` takes the composed ``recipes/embed.yaml``: it builds the model as ``mmclip eval`` does
(:func:`mmclip.cli.evaluate.load_model`), the source from the ``source`` node, and runs
:func:`mmclip.embedding.writer.embed_corpus` in this process, or Lightning's predict loop
(:func:`mmclip.embedding.predict.embed_corpus_lightning`) for several devices or nodes. The store's
``meta.json`` records the recipe's model nodes and checkpoint (:func:`model_spec`), from which
``mmclip search`` rebuilds the model (:func:`model_from_spec`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mmclip.cli.recipe import RECIPES_DIR, plain

__all__ = ["embed", "main", "model_from_spec", "model_spec"]

log = logging.getLogger("mmclip")


def model_spec(cfg: DictConfig) -> dict[str, Any]:
    """The plain spec in ``meta.json`` that rebuilds the recipe's model: its model / tower nodes, the
    checkpoint (an absolute path) and the seed random weights come from."""
    checkpoint = cfg.get("checkpoint")
    if checkpoint and Path(str(checkpoint)).expanduser().exists():  # a local path (not a hub id): absolute
        checkpoint = str(Path(str(checkpoint)).expanduser().resolve())
    return {
        "model": plain(cfg.model),
        "image_tower": plain(cfg.get("image_tower")),
        "text_tower": plain(cfg.get("text_tower")),
        "checkpoint": checkpoint,
        "seed": int(cfg.get("seed", 0)),
        "imports": plain(cfg.get("imports")) or [],
    }


def model_from_spec(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The ``(model, tokenizer)`` a :func:`model_spec` describes (e.g. ``EmbeddingStore.meta["model"]``).

    Raises:
        ValueError: the spec has no recipe model nodes (a store written from arrays or by a library call
            without ``model_spec``).
    """
    from mmclip.cli.evaluate import load_model

    if "model" not in spec:
        raise ValueError(
            "this store's meta.json does not say how to rebuild its model (it was not written by `mmclip embed`); "
            "embed the query yourself and pass it with --embedding FILE.npy"
        )
    cfg = OmegaConf.create(
        {
            "model": spec["model"],
            "image_tower": spec.get("image_tower"),
            "text_tower": spec.get("text_tower"),
            "checkpoint": spec.get("checkpoint"),
            "imports": spec.get("imports") or [],
        }
    )
    torch.manual_seed(int(spec.get("seed", 0)))  # random weights (no checkpoint) as the embedding run drew them
    return load_model(cfg)


def _device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator not in ("auto", "cpu"):
        raise ValueError(f"accelerator must be auto, cpu, gpu or cuda on one device, got {accelerator!r}")
    return torch.device("cpu")


def embed(cfg: DictConfig) -> Any:
    """Runs the embedding ``recipes/embed.yaml`` describes; returns this process's ``EmbedResult``."""
    from mmclip.embedding.sources import build_source
    from mmclip.embedding.writer import embed_corpus

    torch.manual_seed(int(cfg.seed))  # every rank draws the same random weights when there is no checkpoint
    spec = model_spec(cfg)
    model, tokenizer = model_from_spec(spec)
    source = build_source(**plain(cfg.source))
    common = dict(
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        shard_size=int(cfg.shard_size),
        precision=str(cfg.precision),
        channels_last=bool(cfg.channels_last),
        progress=bool(cfg.progress),
        model_spec=spec,
    )
    use_lightning = cfg.get("lightning")
    if use_lightning is None:
        use_lightning = str(cfg.devices) != "1" or int(cfg.num_nodes) > 1
    log.info(
        "embedding %d samples of %s (%s) into %s", len(source), source.spec()["path"], source.kind, cfg.out
    )
    if use_lightning:
        from mmclip.embedding.predict import embed_corpus_lightning

        return embed_corpus_lightning(
            model,
            tokenizer,
            source,
            cfg.out,
            accelerator=str(cfg.accelerator),
            devices=cfg.devices,
            num_nodes=int(cfg.num_nodes),
            strategy=str(cfg.strategy),
            **common,  # type: ignore[arg-type]
        )
    return embed_corpus(model, tokenizer, source, cfg.out, device=_device(str(cfg.accelerator)), **common)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """``mmclip embed [OVERRIDES...]``: hydra's command line (``--cfg job``, ``--help``) included."""
    import sys

    import hydra

    import __main__

    @hydra.main(version_base="1.3", config_path=str(RECIPES_DIR), config_name="embed")
    def _run(cfg: DictConfig) -> None:
        from rich.console import Console

        result = embed(cfg)
        skipped = sum(result.skipped.values())
        Console().print(
            f"embedded {result.embedded} samples into {result.shards_written} shards "
            f"({result.shards_already_done} of {result.num_shards} were done before), skipped {skipped}: {result.out}"
        )

    args = sys.argv[1:] if argv is None else list(argv)
    # Lightning's DDP launcher starts the other ranks by re-running `sys.argv[0]` (or `python -m` the main
    # module) with the same overrides: point both at this file so every rank runs the embedding entry point.
    sys.argv = [str(Path(__file__).resolve()), *args]
    if getattr(__main__, "__spec__", None) is not None and __main__.__spec__.name != __name__:
        __main__.__spec__ = None
    _run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
