"""``mmclip vlm CHECKPOINT IMAGE... --prompt TEXT``: answer a prompt about images with a trained :class:`VLMTask`.

The prompt holds one ``<image>`` marker per image, in the order the images are given; a prompt without markers
gets one per image at its start. The checkpoint is loaded weights-only; the frozen image tower and language
model are rebuilt from the sources it records (and checked against its fingerprints).

Example::

    mmclip vlm runs/vlm_shapes/checkpoints/last.ckpt scene.png --prompt "question: what colour is the shape? answer:"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mmclip.models.vlm import MEDIA_TOKEN

__all__ = ["main", "prompt_with_images"]


def prompt_with_images(prompt: str, n_images: int) -> str:
    """``prompt`` with one image marker per image (put at its start when it has none).

    Raises:
        ValueError: the prompt's markers do not match the number of images.
    """
    markers = prompt.count(MEDIA_TOKEN)
    if markers == 0:
        return MEDIA_TOKEN * n_images + prompt
    if markers != n_images:
        raise ValueError(f"the prompt has {markers} {MEDIA_TOKEN} markers for {n_images} images: give one per image")
    return prompt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmclip vlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a VLMTask checkpoint (.ckpt)")
    parser.add_argument("images", nargs="+", help="image files, in the order of the prompt's <image> markers")
    parser.add_argument("--prompt", required=True, help="the text; '<image>' marks where each image goes")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    from PIL import Image

    from mmclip.data.transforms import image_transform
    from mmclip.tasks.vlm import VLMTask

    if not Path(args.checkpoint).is_file():
        print(f"mmclip vlm: no checkpoint at {args.checkpoint}", file=sys.stderr)
        return 2
    try:
        prompt = prompt_with_images(args.prompt, len(args.images))
        pictures = []
        for path in args.images:
            with Image.open(path) as im:
                pictures.append(im.convert("RGB"))
    except (ValueError, OSError) as err:
        print(f"mmclip vlm: {err}", file=sys.stderr)
        return 2
    task = VLMTask.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True).eval()
    transform = image_transform(task.data_config, train=False)
    images = torch.stack([transform(p) for p in pictures])[None]  # (1, T, 3, H, W)
    (answer,) = task.model.answer([prompt], images, args.max_new_tokens)
    print(answer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
