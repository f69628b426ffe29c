"""The ``mmclip`` command.

``mmclip train`` and ``mmclip eval`` run the hydra recipes in ``recipes/`` (see ``mmclip.cli.train``).
``mmclip models [PATTERN]`` prints the named model configs with their resolution, parameter counts
(total / image / text, in millions, counted on the real modules built on the meta device) and
embedding width.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

USAGE = """usage: mmclip COMMAND [ARGS]

commands:
  models [PATTERN]   table of named models (shell-style PATTERN, e.g. 'ViT-*')
  train [OVERRIDES]  train a recipe, e.g. `mmclip train experiment=shapes_tiny trainer.devices=2`
  eval [OVERRIDES]   evaluate a model, e.g. `mmclip eval model=vit_b_32 checkpoint=PATH data=...`
                     (hydra: `--cfg job` prints the composed config, `--help` lists the groups)
  embed [OVERRIDES]  embed a corpus into a resumable store of fp16 shards, e.g.
                     `mmclip embed model=vit_b_32 checkpoint=PATH source.kind=images source.path=DIR out=DIR`
  search OUT (--text T | --image PATH) [-k 5] [--faiss] [--json]
                     exact top-k over a store written by `mmclip embed`
  caption CKPT IMAGES...
                     caption images (files or folders) with a captioning checkpoint: JSON lines
                     (--strategy greedy|beam|nucleus, --out FILE); train one with
                     `mmclip train -cn caption experiment=caption_shapes`
  vlm CKPT IMAGES... --prompt TEXT
                     answer a prompt about images with a vision-language checkpoint (one <image>
                     marker per image); train one with `mmclip train -cn vlm experiment=vlm_shapes`
"""


def model_table(pattern: str = "*") -> list[dict[str, object]]:
    """One row per named model: name, resolution, parameters in millions, embedding width."""
    import mmclip

    rows = []
    for name in mmclip.list_models(pattern):
        with torch.device("meta"):
            model = mmclip.create_model(name)
        counts = mmclip.count_parameters(model)
        rows.append(
            {
                "name": name,
                "resolution": model.data_config.image_size[0],
                "total_m": counts["total"] / 1e6,
                "image_m": counts["image"] / 1e6,
                "text_m": counts["text"] / 1e6,
                "embed_dim": model.embed_dim,
            }
        )
    return rows


def _print_models(pattern: str) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = model_table(pattern)
    if not rows:
        print(f"no model matches {pattern!r}", file=sys.stderr)
        return 1
    table = Table(title="mmclip named models (parameters in millions)")
    for col, justify in (
        ("name", "left"),
        ("res", "right"),
        ("total", "right"),
        ("image", "right"),
        ("text", "right"),
        ("embed", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            str(r["name"]),
            str(r["resolution"]),
            f"{r['total_m']:.2f}",
            f"{r['image_m']:.2f}",
            f"{r['text_m']:.2f}",
            str(r["embed_dim"]),
        )
    Console().print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "models":
        return _print_models(rest[0] if rest else "*")
    if command == "train":
        from mmclip.cli.train import main as train_main

        return train_main(rest)
    if command == "eval":
        from mmclip.cli.evaluate import main as eval_main

        return eval_main(rest)
    if command == "embed":
        from mmclip.cli.embed import main as embed_main

        return embed_main(rest)
    if command == "search":
        from mmclip.cli.search import main as search_main

        return search_main(rest)
    if command == "caption":
        from mmclip.cli.caption import main as caption_main

        return caption_main(rest)
    if command == "vlm":
        from mmclip.cli.vlm import main as vlm_main

        return vlm_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
