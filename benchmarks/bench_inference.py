"""Image and text embedding throughput: mmclip vs open_clip with the same weights, in the same run.

Texts are captions of real length (COCO-style, ~10-20 tokens), so the text numbers show what trimming
to the longest real sequence buys. Each row also gives the fraction of this machine's measured fp32
(or bf16 on GPU) matmul FLOP/s reached, from FLOPs counted on the implementation's own forward.

    python benchmarks/bench_inference.py                    # CPU, ViT-B-32 and RN50
    python benchmarks/bench_inference.py --models ViT-B-32 --batch 32 --iters 10

Prints a table and writes benchmarks/results/bench_inference.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import mmclip
from mmclip.models.convert import convert_openclip_state_dict, load_checkpoint

SUBJECTS = [
    "a man",
    "a woman",
    "two dogs",
    "a little girl",
    "a group of people",
    "a cat",
    "an old truck",
    "a plate of food",
    "a red bus",
    "three children",
    "a skateboarder",
    "a herd of sheep",
]
ACTIONS = [
    "sitting on",
    "standing next to",
    "walking down",
    "riding",
    "laying on top of",
    "looking at",
    "parked beside",
    "playing with",
]
PLACES = [
    "a wooden bench",
    "a busy city street",
    "the beach at sunset",
    "a grassy field",
    "a kitchen counter",
    "a snowy mountain road",
    "a table with a white cloth",
    "an empty parking lot in the rain",
]


def captions(n: int, seed: int = 0) -> list[str]:
    """COCO-style captions of realistic length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
        if rng.random() < 0.5:
            text += f" with {rng.choice(SUBJECTS)} in the background"
        out.append(text + ".")
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 2048, iters: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_fn(lambda: a @ b, device, iters)
    return 2 * n**3 / seconds


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_model(
    name: str, batch: int, iters: int, device: torch.device, dtype: torch.dtype, peak: float
) -> list[dict]:
    import open_clip

    torch.manual_seed(0)
    oc = open_clip.create_model(name, pretrained=None).eval()
    mm = mmclip.create_model(name).eval()
    load_checkpoint(mm, convert_openclip_state_dict(oc.state_dict()))
    oc, mm = oc.to(device), mm.to(device)
    size = mm.data_config.image_size
    images = torch.randn(batch, 3, *size, device=device)
    ids = open_clip.get_tokenizer(name)(captions(batch)).to(device)
    real_len = float((ids.argmax(-1) + 1).float().mean())
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(fn):
        def call():
            with torch.inference_mode(), autocast:
                fn()

        return call

    with torch.inference_mode():  # same weights -> same outputs
        diff = (
            (mm.encode_image(images[:2], normalize=True) - oc.encode_image(images[:2], normalize=True))
            .abs()
            .max()
        )
    untrimmed = copy.deepcopy(mm)
    untrimmed.text_tower.trim = False

    def untrimmed_text() -> None:
        untrimmed.encode_text(ids)

    rows = []
    for kind, fns in (
        (
            "image",
            {
                "mmclip": run(lambda: mm.encode_image(images)),
                "open_clip": run(lambda: oc.encode_image(images)),
            },
        ),
        ("text", {"mmclip": run(lambda: mm.encode_text(ids)), "open_clip": run(lambda: oc.encode_text(ids))}),
    ):
        seconds = {impl: [] for impl in fns}
        for _ in range(3):  # interleave rounds so drift hits both implementations alike
            for impl, fn in fns.items():
                seconds[impl].append(time_fn(fn, device, max(1, iters // 3)))
        # FLOPs are counted on mmclip's modules (plain ops the counter sees; open_clip's fused attention
        # kernel is invisible to it), for the work each implementation does: open_clip's text runs all
        # 77 positions, mmclip's stops at the longest caption.
        work = {"mmclip": fns["mmclip"], "open_clip": fns["mmclip"]}
        if kind == "text":
            work["open_clip"] = run(untrimmed_text)
        result = {}
        for impl in fns:
            sec = min(seconds[impl])
            flops = count_flops(work[impl]) / batch
            result[impl] = {
                "samples_per_s": batch / sec,
                "gflops_per_sample": flops / 1e9,
                "matmul_fraction": flops * batch / sec / peak,
            }
        rows.append(
            {
                "model": name,
                "kind": kind,
                "batch": batch,
                "device": str(device),
                "dtype": str(dtype).split(".")[-1],
                "mean_text_tokens": real_len if kind == "text" else None,
                "mmclip": result["mmclip"],
                "open_clip": result["open_clip"],
                "ratio": result["mmclip"]["samples_per_s"] / result["open_clip"]["samples_per_s"],
                "max_abs_diff_image_embeds": float(diff),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "RN50"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_inference.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    peak = matmul_flops_per_s(device, dtype)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batch, args.iters, device, dtype, peak)

    header = (
        f"{'model':<10} {'kind':<6} {'mmclip/s':>9} {'open_clip/s':>11} {'ratio':>6} "
        f"{'mm GF/s.':>8} {'oc GF/s.':>8} {'mm %mm':>7} {'oc %mm':>7}"
    )
    print(
        f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"dtype {dtype}, measured matmul peak {peak / 1e9:.1f} GFLOP/s, batch {args.batch}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        m, o = r["mmclip"], r["open_clip"]
        print(
            f"{r['model']:<10} {r['kind']:<6} {m['samples_per_s']:>9.1f} {o['samples_per_s']:>11.1f} "
            f"{r['ratio']:>6.2f} {m['gflops_per_sample']:>8.2f} {o['gflops_per_sample']:>8.2f} "
            f"{100 * m['matmul_fraction']:>6.1f}% {100 * o['matmul_fraction']:>6.1f}%"
        )
    text_tokens = [r["mean_text_tokens"] for r in rows if r["mean_text_tokens"]]
    if text_tokens:
        print(f"texts: mean {statistics.mean(text_tokens):.1f} real tokens of 77 (GF/s. = GFLOPs per sample)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"matmul_peak_flops": peak, "torch": torch.__version__, "rows": rows}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
