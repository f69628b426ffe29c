"""``mmclip caption CHECKPOINT IMAGE_OR_DIR...``: caption images with a trained :class:`CaptioningTask`.

Writes one JSON line per captioned image, ``{"image": path, "caption": text}``, to stdout or ``--out``, in the
order the images were given (folders are searched recursively for image files, sorted by path). The
checkpoint is loaded weights-only (``torch.load(weights_only=True)``); images are prepared with the image
tower's own ``data_config`` and captioned in batches. Progress and problems go to stderr: an image that
cannot be read is reported and counted, and the run goes on.

Example::

    mmclip caption runs/caption_shapes/checkpoints/last.ckpt photos/ --strategy beam --num-beams 3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = ["IMAGE_EXTENSIONS", "caption_images", "find_images", "main"]

log = logging.getLogger("mmclip.caption")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """The images to caption: each file as given, and the image files under each folder (recursive, sorted).

    A path that does not exist is kept, so that it is reported as unreadable with the others.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            found.append(p)
    return found


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def caption_images(
    task: Any,
    images: list[Path],
    out: TextIO,
    strategy: str = "greedy",
    batch_size: int = 32,
    progress: bool = True,
    **generate: Any,
) -> dict[str, int]:
    """Captions ``images`` with ``task`` (a :class:`CaptioningTask`) and writes JSON lines to ``out``.

    Args:
        task: the loaded task (its ``data_config`` prepares the images).
        images: image files.
        out: where the ``{"image", "caption"}`` lines go.
        strategy: ``"greedy"``, ``"beam"`` or ``"nucleus"``.
        batch_size: images per generation call.
        progress: a progress bar on stderr.
        **generate: further ``PrefixCaptioner.generate`` options (``num_beams``, ``top_p``, ``max_new_tokens``).

    Returns:
        ``{"captioned": n, "unreadable": k}``.
    """
    from rich.progress import Progress

    from mmclip.data.quality import SkipSample, decode_image
    from mmclip.data.transforms import image_transform

    transform = image_transform(task.data_config, train=False)
    counts = {"captioned": 0, "unreadable": 0}
    with Progress(transient=True, disable=not progress, console=_stderr_console()) as bar:
        job = bar.add_task("captioning", total=len(images))
        for chunk in _chunks(images, batch_size):
            tensors, kept = [], []
            for path in chunk:
                try:
                    tensors.append(transform(decode_image(path)))  # (3, H, W)
                    kept.append(path)
                except (SkipSample, OSError, ValueError) as err:
                    counts["unreadable"] += 1
                    log.warning("unreadable image %s: %s", path, err)
            if kept:
                captions = task.caption(torch.stack(tensors), strategy=strategy, **generate)  # B strings
                for path, caption in zip(kept, captions, strict=True):
                    out.write(json.dumps({"image": str(path), "caption": caption}) + "\n")
                out.flush()
                counts["captioned"] += len(kept)
            bar.advance(job, len(chunk))
    return counts


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmclip caption", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", help="a CaptioningTask checkpoint (.ckpt) written by `mmclip train -cn caption`"
    )
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--strategy", choices=("greedy", "beam", "nucleus"), default="greedy")
    parser.add_argument("--num-beams", type=int, default=5, help="beam width for --strategy beam")
    parser.add_argument("--top-p", type=float, default=0.8, help="nucleus mass for --strategy nucleus")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (nucleus)")
    parser.add_argument("--seed", type=int, default=0, help="seed of nucleus sampling")
    parser.add_argument(
        "--max-length", type=int, default=None, help="most tokens per caption (default: the model's)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--out", default=None, help="write the JSON lines here instead of stdout")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``mmclip caption``; returns 0, or 1 when no image could be captioned."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.batch_size < 1 or args.num_beams < 1:
        print("--batch-size and --num-beams must be >= 1", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from mmclip.tasks.captioning import CaptioningTask

    task = CaptioningTask.load_from_checkpoint(args.checkpoint, map_location=args.device, weights_only=True)
    task.eval()
    images = find_images(args.images)
    if not images:
        print("no images found in " + " ".join(args.images), file=sys.stderr)
        return 1
    generate: dict[str, Any] = {
        "num_beams": args.num_beams,
        "top_p": args.top_p,
        "temperature": args.temperature,
    }
    if args.max_length is not None:
        generate["max_new_tokens"] = args.max_length
    torch.manual_seed(args.seed)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 (closed below)
    try:
        counts = caption_images(
            task, images, out, args.strategy, args.batch_size, progress=not args.no_progress, **generate
        )
    finally:
        if args.out:
            out.close()
    print(
        f"captioned {counts['captioned']} image(s); {counts['unreadable']} unreadable"
        + (f"; written to {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0 if counts["captioned"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
