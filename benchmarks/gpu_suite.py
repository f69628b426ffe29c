"""The GPU suite: mmclip against open_clip (and timm) on one GPU, in one command of at most about 6 minutes.

    make gpu-bench                            # python benchmarks/gpu_suite.py on the GPU machine
    python benchmarks/gpu_suite.py --smoke    # tiny models on whatever device is here: every road, ~1 min

Sections (each is timed, and one that fails is recorded with its error; the others still run):

a. train: a ViT-B/16 CLIP training step in bf16 autocast (forward, CLIP loss, backward, fused AdamW) at the
   largest batch that fits, mmclip eager and compiled vs ``open_clip.create_model`` eager and
   ``torch.compile``d, same weights. Samples/s and MFU: the forward FLOPs of the full model (77-token
   captions, as open_clip runs them) counted with ``torch.utils.flop_counter``, x3 for forward + backward,
   over the card's dense bf16 peak. mmclip's host syncs per step are counted with CUDA's sync debug mode.
b. embed_image: ViT-B/16 and ViT-B/32 image embedding, bf16, batch 1024: mmclip vs open_clip vs timm's same
   architecture (``vit_base_patch16_clip_224`` / ``vit_base_patch32_clip_224``).
c. embed_text: text embedding of COCO-length captions, bf16, batch 1024: mmclip vs open_clip.
d. loader: images/s of the training loader with 16 workers on the same webdataset shards of JPEGs,
   mmclip's ``WebDatasetDataModule`` vs ``open_clip_train``'s ``get_wds_dataset``, next to what the
   training step of (a) consumes.
e. fsdp: ``trainer=fsdp``'s strategy (``mmclip.tasks.strategies.fsdp_strategy``): a fit of 4 steps, and a fit
   of 2 steps saved as a sharded checkpoint and resumed to 4; the resumed losses must equal the straight
   ones.

Writes ``benchmarks/results/gpu_suite.json`` (``--out``) and prints a table per section. The GPU machine has
torch, lightning, timm and transformers; open_clip_torch, ftfy, webdataset and braceexpand travel as wheels
(``make gpu-wheels`` downloads them into ``.whl/``; ``make gpu-bench`` installs them from there).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import multiprocessing
import os
import platform
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # mmclip from this checkout

from bench_inference import captions, count_flops, time_fn  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name(); first match wins.
BF16_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H20", 148e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)

SMOKE_CFG = {  # a CLIP ViT small enough to compile and train on a CPU in seconds
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# ---- set-up --------------------------------------------------------------------------------------------
def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    """The card's dense bf16 peak and where the number comes from (None off CUDA or for an unknown card)."""
    if device.type != "cuda":
        return None, "no CUDA device"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAKS:
        if key in name:
            return peak, f"datasheet dense bf16 for {key} ({name})"
    return None, f"unknown card {name}: add it to BF16_PEAKS"


def model_pair(name: str, smoke: bool, device: torch.device) -> tuple[Any, Any, dict]:
    """open_clip's model and mmclip's of the same architecture, with the same (random) weights."""
    import open_clip

    from mmclip.models.convert import convert_openclip_state_dict, load_checkpoint
    from mmclip.models.convert.openclip import spec_from_openclip_config
    from mmclip.models.dual_encoder import DualEncoder

    torch.manual_seed(0)
    if smoke:
        cfg = copy.deepcopy(SMOKE_CFG)
        theirs = open_clip.model.CLIP(**copy.deepcopy(cfg), output_dict=True)
    else:
        cfg = open_clip.get_model_config(name)
        theirs = open_clip.create_model(name, pretrained=None, output_dict=True)
    ours = DualEncoder.from_config(spec_from_openclip_config(cfg))
    load_checkpoint(ours, convert_openclip_state_dict(theirs.state_dict()))
    return theirs.to(device), ours.to(device), cfg


def timm_vit(name: str, smoke: bool, device: torch.device) -> Any:
    import timm

    patch = 32 if "32" in name else 16
    kwargs: dict[str, Any] = {"num_classes": 512}
    if smoke:
        v = SMOKE_CFG["vision_cfg"]
        kwargs = dict(num_classes=SMOKE_CFG["embed_dim"], img_size=v["image_size"], patch_size=v["patch_size"],
                      embed_dim=v["width"], depth=v["layers"], num_heads=v["width"] // v["head_width"])
    return timm.create_model(f"vit_base_patch{patch}_clip_224", pretrained=False, **kwargs).to(device).eval()


def token_ids(n: int, device: torch.device) -> torch.Tensor:
    from mmclip.tokenizers import get_tokenizer

    return get_tokenizer("clip")(captions(n)).to(device)  # (n, 77), COCO-length captions


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---- (a) the training step -----------------------------------------------------------------------------
def train_step(kind: str, model: Any, device: torch.device, images: torch.Tensor, ids: torch.Tensor) -> Any:
    """One training step of ``kind`` ("mmclip" or "open_clip") as a closure, with its optimizer."""
    import open_clip

    from mmclip.losses import ClipLoss
    from mmclip.tasks.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-4, fused=device.type == "cuda")  # the same AdamW groups for both
    if kind == "mmclip":
        loss_fn = ClipLoss()

        def loss_of() -> torch.Tensor:
            return loss_fn(model(images, ids))["loss"]
    else:
        loss_fn = open_clip.loss.ClipLoss()

        def loss_of() -> torch.Tensor:
            out = model(images, ids)
            return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    def step() -> None:
        with autocast(device):
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def variants(theirs: Any, ours: Any, compiled: bool = True) -> dict[str, Any]:
    """The four models of (a): each library eager and compiled (mmclip the way ``task.compile`` does it)."""
    if not compiled:
        return {"mmclip eager": ("mmclip", ours), "open_clip eager": ("open_clip", theirs)}
    compiled_ours = copy.deepcopy(ours)
    compiled_ours.image_tower.compile()
    compiled_ours.text_tower.compile()
    return {
        "mmclip eager": ("mmclip", ours),
        "mmclip compiled": ("mmclip", compiled_ours),
        "open_clip eager": ("open_clip", theirs),
        "open_clip compiled": ("open_clip", torch.compile(theirs)),
    }


def largest_batch(make_step: Any, candidates: list[int]) -> int:
    for batch in candidates:
        try:
            step = make_step(batch)
            step()
            step()
            del step
            free()
            return batch
        except torch.OutOfMemoryError:
            free()
    raise RuntimeError(f"no batch of {candidates} fits")


def count_host_syncs(step: Any, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def section_train(args: argparse.Namespace, device: torch.device, out: dict) -> list[dict]:
    from mmclip.tasks.accelerate import pad_text_for_compile

    theirs, ours, cfg = model_pair("ViT-B-16", args.smoke, device)
    size = cfg["vision_cfg"]["image_size"]
    full_ids = token_ids(args.max_batch, device)
    real = pad_text_for_compile(full_ids, ours.text_tower, 16)  # what a compiled task feeds its text tower

    def data(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        return torch.randn(batch, 3, size, size, device=device, generator=g), full_ids[:batch]

    def eager_steps(batch: int) -> Any:  # the batch must fit both libraries' eager steps
        images, ids = data(batch)
        steps = [train_step("mmclip", ours, device, images, ids), train_step("open_clip", theirs, device, images, ids)]
        return lambda: [step() for step in steps]

    candidates = [b for b in args.batches if b <= args.max_batch]
    batch = largest_batch(eager_steps, candidates) if device.type == "cuda" else candidates[-1]
    images, ids = data(batch)
    with torch.no_grad():  # model FLOPs: the whole forward with 77-token captions, as open_clip runs it
        flops = count_flops(lambda: theirs(images[:1], ids[:1])) * 3  # per sample, forward + backward
    out["train_batch"], out["train_flops_per_sample"] = batch, flops
    peak, _ = bf16_peak(device)
    rows = []
    for label, (kind, model) in variants(theirs, ours, not args.eager_only).items():
        text = real[:batch] if label == "mmclip compiled" else ids
        step = train_step(kind, model, device, images, text)
        start = time.perf_counter()
        try:
            step()  # compiles, for the compiled rows
            first = time.perf_counter() - start
            seconds = time_fn(step, device, args.iters, warmup=2)
        except torch.OutOfMemoryError:
            rows.append({"model": label, "batch": batch, "error": "out of memory"})
            del step
            free()
            continue
        rate = batch / seconds
        row = {"model": label, "batch": batch, "samples_per_s": rate, "first_step_s": first,
               "mfu": rate * flops / peak if peak else None,
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        if label == "mmclip eager":
            row["host_syncs_per_step"] = count_host_syncs(step, device)
        rows.append(row)
        del step
        free()
    best = max((r["samples_per_s"] for r in rows if r["model"].startswith("open_clip") and "error" not in r),
               default=None)
    for r in rows:
        r["vs_best_open_clip"] = r["samples_per_s"] / best if best and "error" not in r else None
    return rows


# ---- (b), (c) embedding --------------------------------------------------------------------------------
def embed_rows(name: str, args: argparse.Namespace, device: torch.device, kinds: tuple[str, ...]) -> list[dict]:
    theirs, ours, cfg = model_pair(name, args.smoke, device)
    theirs.eval(), ours.eval()
    size = cfg["vision_cfg"]["image_size"]
    batch = args.embed_batch
    images = torch.randn(batch, 3, size, size, device=device)
    ids = token_ids(batch, device)
    rows = []
    for kind in kinds:
        if kind == "image":
            timm_model = timm_vit(name, args.smoke, device)
            fns = {"mmclip": lambda: ours.encode_image(images), "open_clip": lambda: theirs.encode_image(images),
                   "timm": lambda: timm_model(images)}  # noqa: B023 (called within this iteration)
        else:
            fns = {"mmclip": lambda: ours.encode_text(ids), "open_clip": lambda: theirs.encode_text(ids)}
        rates = {}
        for impl, fn in fns.items():
            def call(fn: Any = fn) -> None:
                with torch.inference_mode(), autocast(device):
                    fn()

            rates[impl] = batch / time_fn(call, device, args.iters, warmup=2)
        for impl, rate in rates.items():
            rows.append({"model": name, "kind": kind, "impl": impl, "batch": batch, "samples_per_s": rate,
                         "vs_open_clip": rate / rates["open_clip"],
                         "vs_timm": rate / rates["timm"] if "timm" in rates else None})
    return rows


def section_embed_image(args: argparse.Namespace, device: torch.device, out: dict) -> list[dict]:
    return [r for name in ("ViT-B-16", "ViT-B-32") for r in embed_rows(name, args, device, ("image",))]


def section_embed_text(args: argparse.Namespace, device: torch.device, out: dict) -> list[dict]:
    rows = embed_rows("ViT-B-16", args, device, ("text",))
    out["mean_caption_tokens"] = float((token_ids(64, device).argmax(-1) + 1).float().mean())
    return rows


# ---- (d) the data loader -------------------------------------------------------------------------------
def _jpeg(i: int) -> bytes:
    """A 256-512 px scene of soft shapes on a gradient, as a quality-90 JPEG."""
    from PIL import Image, ImageDraw

    rng = random.Random(i)
    w, h = rng.randint(256, 512), rng.randint(256, 512)
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):
        x, y, r = rng.randint(0, w), rng.randint(0, h), rng.randint(10, 120)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def section_loader(args: argparse.Namespace, device: torch.device, out: dict) -> list[dict]:
    import open_clip
    from bench_data import _mmclip, _open_clip

    from mmclip.data.collate import RawSample
    from mmclip.data.writers import write_shards
    from mmclip.tokenizers import get_tokenizer

    n, workers = args.loader_images, args.workers
    with tempfile.TemporaryDirectory() as tmp:
        with multiprocessing.get_context("fork").Pool(min(workers, os.cpu_count() or 1)) as pool:
            jpegs = pool.map(_jpeg, range(n), chunksize=64)
        texts = captions(n)
        samples = (RawSample(f"s{i:07d}", jpegs[i], [texts[i]]) for i in range(n))
        shard_size = max(1, n // (2 * workers))  # at least two shards per worker
        paths = write_shards(samples, tmp, "bench", shard_size, image_format="jpg")
        pattern = os.path.join(tmp, f"bench-{{000000..{len(paths) - 1:06d}}}.tar")
        preprocess = {"train": open_clip.image_transform(224, is_train=True)}
        runs = {
            "mmclip": lambda: _mmclip(pattern, n, args.loader_batch, True, False, get_tokenizer("clip"), workers),
            "open_clip": lambda: _open_clip(pattern, n, args.loader_batch, True, preprocess,
                                            open_clip.get_tokenizer("ViT-B-16"), workers),
        }
        rates = {}
        for name, fn in runs.items():
            fn()  # warm: the page cache, worker start-up paths
            count, seconds = fn()
            rates[name] = count / seconds
    consumed = max((r["samples_per_s"] for r in out.get("sections", {}).get("train", {}).get("rows", [])),
                   default=None)
    return [{"loader": name, "workers": workers, "images": n, "images_per_s": rate,
             "vs_open_clip": rate / rates["open_clip"],
             "vs_fastest_train_step": rate / consumed if consumed else None} for name, rate in rates.items()]


# ---- (e) FSDP ------------------------------------------------------------------------------------------
def section_fsdp(args: argparse.Namespace, device: torch.device, out: dict) -> list[dict]:
    if device.type != "cuda":
        raise RuntimeError("skipped: FSDP shards over CUDA GPUs (the CPU road stops with a message; tested)")
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mmclip.data.batch import ImageTextBatch
    from mmclip.tasks import ContrastiveTask
    from mmclip.tasks.strategies import fsdp_strategy

    ids = token_ids(32, torch.device("cpu"))

    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> Any:
            g = torch.Generator().manual_seed(0)
            batches = [ImageTextBatch(torch.randn(32, 3, 224, 224, generator=g), ids, [str(i) for i in range(32)])
                       for _ in range(2)]  # an epoch of 2 batches: the save at step 2 ends an epoch
            return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)

    class Losses(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *rest: Any) -> None:
            self.losses.append(float(outputs["loss"]))

    def fit(steps: int, root: str, ckpt: str | None = None, save: bool = False) -> tuple[list[float], float]:
        pl.seed_everything(0)
        record = Losses()
        callbacks: list[Any] = [record]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=steps, save_top_k=-1))
        task = ContrastiveTask("ViT-B-16", optimizer={"lr": 1e-4}, scheduler={"name": None})
        trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=fsdp_strategy(), precision="bf16-mixed",
                             max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=save, callbacks=callbacks, default_root_dir=root,
                             use_distributed_sampler=False)  # Lightning's would reshuffle per epoch
        start = time.perf_counter()
        trainer.fit(task, datamodule=Data(), ckpt_path=ckpt, weights_only=True if ckpt else None)
        return record.losses, time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        straight, seconds = fit(4, tmp + "/straight")
        first, _ = fit(2, tmp + "/first", save=True)
        (saved,) = Path(tmp, "first").glob("*.ckpt")
        files = sorted(p.name for p in saved.iterdir()) if saved.is_dir() else [saved.name]
        is_directory = saved.is_dir()
        resumed, _ = fit(4, tmp + "/resumed", ckpt=str(saved))
        import mmclip

        loads = mmclip.create_model(str(saved)) is not None  # the sharded directory as a model source
    return [{"fit_4_steps_s": seconds, "checkpoint_is_directory": is_directory, "checkpoint_files": files,
             "loads_as_model_source": loads,
             "straight_losses": straight, "resumed_losses": first + resumed,
             "resume_exact": first + resumed == straight,
             "max_abs_loss_diff": max(abs(a - b) for a, b in zip(first + resumed, straight, strict=True))}]


SECTIONS = {
    "train": section_train,
    "embed_image": section_embed_image,
    "embed_text": section_embed_text,
    "loader": section_loader,
    "fsdp": section_fsdp,
}


# ---- report --------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def print_table(name: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\n## {name}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models and data: checks every road quickly")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated of {list(SECTIONS)}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_suite.json"))
    parser.add_argument("--eager-only", action="store_true", help="(a) without the compiled rows")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds; later sections are skipped past it")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.batches = [768, 512, 384, 256, 128] if not args.smoke else [8]
    args.max_batch = max(args.batches)
    args.iters = 10 if not args.smoke else 2
    args.embed_batch = 1024 if not args.smoke else 16
    args.workers = 16 if not args.smoke else 2
    args.loader_images = 8192 if not args.smoke else 64
    args.loader_batch = 256 if not args.smoke else 16
    peak, peak_source = bf16_peak(device)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "bf16_peak_flops": peak,
        "peak_source": peak_source,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "sections": {},
    }
    with contextlib.suppress(ImportError):
        import open_clip

        out["open_clip"] = open_clip.__version__
    start = time.perf_counter()
    for name in args.only.split(","):
        if time.perf_counter() - start > args.budget:
            out["sections"][name] = {"error": f"skipped: past the {args.budget:.0f} s budget"}
            continue
        t0 = time.perf_counter()
        try:
            rows = SECTIONS[name](args, device, out)
            out["sections"][name] = {"rows": rows, "seconds": time.perf_counter() - t0}
            print_table(name, rows)
        except Exception as exc:  # a broken section is recorded; the others still run
            out["sections"][name] = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0,
                                     "traceback": traceback.format_exc()[-4000:]}
            print(f"\n## {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        free()
    out["total_seconds"] = time.perf_counter() - start
    extra = {k: v for k, v in out.items() if k.startswith(("train_", "mean_"))}
    print(f"\ndevice: {out['device']} (peak {peak_source}); {extra}; {out['total_seconds']:.0f} s in all")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
