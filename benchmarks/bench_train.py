"""Training throughput: an mmclip training step vs an open_clip one, same model, batch, optimizer, same run.

Both sides build the same architecture from the same weights (open_clip's model converted into mmclip),
take the same images and the same token ids (captions of real length, ~10-20 tokens), and run forward,
their own CLIP loss, backward and AdamW (lr 5e-4, betas (0.9, 0.98), eps 1e-6, wd 0.2 on matrices).
mmclip's step is ``ContrastiveTask.training_step``'s work: ``DualEncoder`` + ``ClipLoss`` + the
``build_optimizer`` groups. Rounds alternate between the two so drifts in machine speed hit both.

    python benchmarks/bench_train.py                       # CPU, a ViT-B/32-shaped model at 4 layers
    python benchmarks/bench_train.py --layers 12 --batch 64 --device cuda --precision bf16

On a GPU the table also gives model FLOPs utilisation (FLOPs counted on mmclip's forward, x3 for training,
over the device's dense bf16 peak given by --peak-tflops).

Prints a table and writes benchmarks/results/bench_train.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import mmclip
from mmclip.losses import ClipLoss
from mmclip.models.convert import convert_openclip_state_dict, load_checkpoint
from mmclip.tasks.optim import build_optimizer

try:
    from bench_inference import captions, sync
except ImportError:  # run from the repository root
    from benchmarks.bench_inference import captions, sync


def _openclip_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # open_clip's training script: no decay for ndim < 2, "bn", "ln", "bias", "logit_scale"
    def exclude(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale"))

    named = list(model.named_parameters())
    decay = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    no_decay = [p for n, p in named if exclude(n, p) and p.requires_grad]
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def build(args: argparse.Namespace, device: torch.device):
    import open_clip

    cfg = open_clip.get_model_config(args.model)
    cfg["vision_cfg"]["layers"] = args.layers
    cfg["text_cfg"]["layers"] = args.layers
    oc = open_clip.CLIP(**cfg).to(device)
    mm_cfg = mmclip.get_model_config(args.model)
    mm = mmclip.create_model(
        args.model, image_tower={"layers": args.layers}, text_tower={"layers": args.layers}
    ).to(device)
    load_checkpoint(mm, convert_openclip_state_dict({k: v.cpu() for k, v in oc.state_dict().items()}))
    assert mm_cfg["embed_dim"] == cfg["embed_dim"]
    return mm, oc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--layers", type=int, default=4, help="blocks per tower (12 = the full model)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_train.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    mm, oc = build(args, device)
    import open_clip

    size = mm.data_config.image_size
    images = torch.randn(args.batch, 3, *size, device=device)
    ids = open_clip.get_tokenizer(args.model)(captions(args.batch)).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    mm_loss, oc_loss = ClipLoss(), open_clip.ClipLoss()
    mm_opt = build_optimizer(mm, lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    oc_opt = _openclip_optimizer(oc)

    def mm_step() -> None:
        mm_opt.zero_grad(set_to_none=True)
        with amp:
            loss = mm_loss(mm(images, ids))["loss"]
        loss.backward()
        mm_opt.step()
        mm_loss.clamp_(mm.logit_scale)

    def oc_step() -> None:
        oc_opt.zero_grad(set_to_none=True)
        with amp:
            image_features, text_features, logit_scale = oc(images, ids)[:3]
            loss = oc_loss(image_features, text_features, logit_scale)
        loss.backward()
        oc_opt.step()
        with torch.no_grad():
            oc.logit_scale.clamp_(0, 4.6052)

    def timed(step) -> float:
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        return args.batch * args.steps / (time.perf_counter() - t)

    for step in (mm_step, oc_step):  # warm-up
        step()
        step()
    rates: dict[str, list[float]] = {"mmclip": [], "open_clip": []}
    for _ in range(args.rounds):
        rates["mmclip"].append(timed(mm_step))
        rates["open_clip"].append(timed(oc_step))
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "model": args.model,
        "layers": args.layers,
        "batch": args.batch,
        "device": str(device),
        "precision": args.precision,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "samples_per_s": med,
        "rounds": rates,
        "ratio": med["mmclip"] / med["open_clip"],
    }
    if device.type == "cuda":
        with FlopCounterMode(display=False) as counter, torch.no_grad(), amp:
            mm(images, ids)
        train_flops = 3 * counter.get_total_flops() / args.batch  # per sample
        for k in ("mmclip", "open_clip"):
            result.setdefault("mfu", {})[k] = med[k] * train_flops / (args.peak_tflops * 1e12)
    print(
        f"training step, {args.model} at {args.layers} layers, batch {args.batch}, {device}, {args.precision}"
    )
    print(f"{'':10s} {'samples/s':>10s}")
    for k, v in med.items():
        print(f"{k:10s} {v:10.1f}" + (f"   MFU {result['mfu'][k]:.1%}" if "mfu" in result else ""))
    print(f"ratio mmclip / open_clip: {result['ratio']:.2f} (target >= 1.0)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
