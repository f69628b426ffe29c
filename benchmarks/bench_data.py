"""Data pipeline throughput: decode + transform + tokenize from webdataset shards, mmclip vs open_clip.

Shards of real-photo JPEGs (crops of the photos scikit-image ships, resized to 256-512 px per side,
quality 90) with COCO-length captions are written to a temporary directory. Both pipelines then read the
same shards in this process (one worker, one torch thread: "images per second per worker"), alternating
rounds, and the median round is reported:

* mmclip: ``WebDatasetDataModule.train_dataloader()`` (RandomResizedCrop 0.9-1.0, bicubic, 224 px, CLIP
  tokenizer, 1000-sample shuffle buffer, bad-input checks) and ``val_dataloader()`` (resize + centre crop);
* open_clip: ``open_clip_train.data.get_wds_dataset`` with open_clip's ``preprocess`` (train / val) and
  tokenizer, the pipeline ``open_clip_train`` trains with (with a one-line shim for webdataset 1.x, whose
  end-of-shard markers open_clip_train 3.3, written for webdataset <= 0.2.86, does not expect).

The eval rows are tensor-identical between the two libraries; ``draft`` rows add JPEG draft decoding
(mmclip's ``draft=True``: decodes large JPEGs at a power-of-two reduction; not pixel-exact).

    python benchmarks/bench_data.py                 # ~2 minutes on 2 cores
    python benchmarks/bench_data.py --n 400 --rounds 2

Writes benchmarks/results/bench_data.json.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from mmclip.data.collate import RawSample
from mmclip.data.wds import WebDatasetDataModule
from mmclip.data.writers import write_shards
from mmclip.tokenizers import get_tokenizer
from mmclip.towers.base import DataConfig

_WORDS = (
    "a the photo of man woman dog cat sitting standing on in front next to red blue green white black small "
    "large old young street table bed car bus train plate pizza kitchen window field grass tree water beach "
    "boat sky people group two three playing holding riding looking at with its and near"
).split()
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def make_samples(n: int, seed: int = 0) -> list[RawSample]:
    """``n`` JPEGs of 256-512 px per side cut from scikit-image's photos, with 8-20 word captions."""
    import skimage.data

    rng = random.Random(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()) for name in _PHOTOS]
    out = []
    for i in range(n):
        photo = rng.choice(photos)
        w, h = rng.randint(256, 512), rng.randint(256, 512)
        scale = max(w / photo.width, h / photo.height, rng.uniform(0.5, 1.0))
        cw, ch = min(photo.width, int(w / scale)), min(photo.height, int(h / scale))
        x, y = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        caption = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 20)))
        out.append(RawSample(f"s{i:07d}", buf.getvalue(), [caption]))
    return out


def _mmclip(
    pattern: str, n: int, batch: int, train: bool, draft: bool, tokenizer, workers: int = 0
) -> tuple[int, float]:
    dm = WebDatasetDataModule(
        train_shards=pattern,
        val_shards=pattern,
        batch_size=batch,
        num_workers=workers,
        shuffle_buffer=1000,
        data_config=DataConfig(),
        tokenizer=tokenizer,
        draft=draft,
        epoch_length=n,
    )
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    start, count = time.perf_counter(), 0
    for b in loader:
        count += len(b)
    return count, time.perf_counter() - start


def _open_clip_wds_compat() -> None:
    """open_clip_train 3.3 targets webdataset <= 0.2.86; webdataset 1.x ends every shard with an empty
    end-of-shard marker that its ``group_by_keys_nothrow`` cannot read. Restore the 0.2.x behaviour."""
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander

    if not isinstance(ocd.tar_file_expander, functools.partial):
        ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def _open_clip(
    pattern: str, n: int, batch: int, train: bool, preprocess: dict, tokenizer, workers: int = 0
) -> tuple[int, float]:
    from open_clip_train.data import get_wds_dataset

    _open_clip_wds_compat()

    args = SimpleNamespace(
        train_data=pattern,
        val_data=pattern,
        dataset_resampled=False,
        train_num_samples=n,
        val_num_samples=n,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch,
        workers=workers,
        world_size=1,
    )
    info = get_wds_dataset(
        args, preprocess["train" if train else "val"], is_train=train, floor=True, tokenizer=tokenizer
    )
    start, count = time.perf_counter(), 0
    for images, _texts in info.dataloader:
        count += images.shape[0]
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1024, help="samples in the shards")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_data.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        samples = make_samples(args.n)
        sizes = [Image.open(io.BytesIO(s.image)).size for s in samples]
        paths = write_shards(samples, tmp, "bench", args.shard_size, image_format="jpg")
        pattern = os.path.join(tmp, f"bench-{{000000..{len(paths) - 1:06d}}}.tar")
        ours_tok = get_tokenizer("clip")
        theirs_tok = open_clip.get_tokenizer("ViT-B-32")
        train_tf = open_clip.image_transform(224, is_train=True)
        val_tf = open_clip.image_transform(224, is_train=False)
        preprocess = {"train": train_tf, "val": val_tf}
        runs = {
            ("train", "mmclip"): lambda: _mmclip(pattern, args.n, args.batch, True, False, ours_tok),
            ("train", "open_clip"): lambda: _open_clip(
                pattern, args.n, args.batch, True, preprocess, theirs_tok
            ),
            ("eval", "mmclip"): lambda: _mmclip(pattern, args.n, args.batch, False, False, ours_tok),
            ("eval", "open_clip"): lambda: _open_clip(
                pattern, args.n, args.batch, False, preprocess, theirs_tok
            ),
            ("train", "mmclip draft"): lambda: _mmclip(pattern, args.n, args.batch, True, True, ours_tok),
            ("eval", "mmclip draft"): lambda: _mmclip(pattern, args.n, args.batch, False, True, ours_tok),
        }
        for fn in runs.values():  # warm-up: file cache, tokenizer caches, imports
            fn()
        rates: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
        counts: dict[tuple[str, str], int] = {}
        for r in range(args.rounds):
            for key, fn in runs.items():
                count, seconds = fn()
                rates[key].append(count / seconds)
                counts[key] = count
            logging.warning("round %d/%d done", r + 1, args.rounds)

    rows = []
    for mode in ("train", "eval"):
        base = statistics.median(rates[(mode, "open_clip")])
        for lib in ("mmclip", "open_clip", "mmclip draft"):
            median = statistics.median(rates[(mode, lib)])
            rows.append(
                {
                    "mode": mode,
                    "pipeline": lib,
                    "images_per_s_per_worker": round(median, 1),
                    "ratio_vs_open_clip": round(median / base, 3),
                    "rounds": [round(x, 1) for x in rates[(mode, lib)]],
                    "images_per_round": counts[(mode, lib)],
                }
            )
    print(f"\n{'mode':6} {'pipeline':14} {'img/s/worker':>12} {'ratio':>6}  rounds")
    for row in rows:
        rounds = ", ".join(f"{x:.0f}" for x in row["rounds"])
        print(
            f"{row['mode']:6} {row['pipeline']:14} {row['images_per_s_per_worker']:12.1f} {row['ratio_vs_open_clip']:6.2f}  {rounds}"
        )
    result = {
        "benchmark": "decode + transform + tokenize from webdataset shards, one worker",
        "samples": args.n,
        "image_px": {"min_side": min(min(s) for s in sizes), "max_side": max(max(s) for s in sizes)},
        "jpeg_quality": 90,
        "batch_size": args.batch,
        "target": "224 px, OpenAI mean/std, bicubic; train RandomResizedCrop(0.9, 1.0)",
        "torch_threads": 1,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "open_clip": open_clip.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
