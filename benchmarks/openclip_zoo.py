"""Every open_clip architecture through mmclip: loaded with parity, or not supported and why.

For each name in ``open_clip.list_models()`` the script builds open_clip's model with random weights, writes it
as an open_clip directory (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``), loads that directory
with ``mmclip.create_model`` (the road a user takes) and compares the normalized image and text embeddings
(fp32, max abs diff <= 1e-5) on random images and token ids.

By default each model is shrunk first: native towers to width 64 and 2 blocks (ResNets to width 8, one block
per stage), timm trunks through the same ``timm.create_model`` keyword arguments in both libraries (depth,
width, heads), keeping every structural option (pooling, norms, activations, projections, vocabulary and
context). ``--full`` runs the real sizes, with a per-model ``--budget`` in seconds: a model whose build is
predicted to take longer (from its parameter count, counted on the meta device), or that would not fit in memory,
is reported as skipped. Where open_clip's own embeddings are not finite with the tests' fixed weight scale (deep
full-size ResNets overflow), the weights are rescaled by their fan-in and the row says so.

    python benchmarks/openclip_zoo.py                  # all names, small (~10 minutes on 2 cores)
    python benchmarks/openclip_zoo.py --full --budget 120 --names 'ViT-B-16*'

Writes ``benchmarks/results/openclip_zoo[_full].json`` and prints a table and a summary by status.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import randomize_  # noqa: E402  (the parity tests' random weights: every tensor counts)

TOL = 1e-5
SMALL = 64  # width of every shrunk tower and of the shared embedding


# ---- shrinking ---------------------------------------------------------------------------------------------
def _timm_small_kwargs(model_name: str) -> dict[str, Any]:
    """Keyword arguments that make a timm model small while keeping its kind (depth, width, heads)."""
    name = model_name.lower()
    if name.startswith(("vit_", "eva", "deit")):
        return {"depth": 2, "embed_dim": SMALL, "num_heads": 2}
    if name.startswith("convnext"):
        return {"depths": (1, 1, 1, 1), "dims": (16, 24, 32, SMALL)}
    return {}


@contextlib.contextmanager
def small_timm(enabled: bool):
    """Makes ``timm.create_model`` build small models, for both libraries, while active."""
    import timm

    original = timm.create_model

    def create(model_name: str, *args: Any, **kwargs: Any) -> Any:
        for key, value in _timm_small_kwargs(model_name).items():
            kwargs.setdefault(key, value)
        return original(model_name, *args, **kwargs)

    if enabled:
        timm.create_model = create
    try:
        yield
    finally:
        timm.create_model = original


def shrink(cfg: dict[str, Any]) -> dict[str, Any]:
    """A small copy of an open_clip model config with the same structure."""
    cfg = copy.deepcopy(cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    cfg["embed_dim"] = SMALL
    if "timm_model_name" not in vision:
        if isinstance(vision.get("layers"), (list, tuple)):  # modified ResNet
            vision.update(layers=[1, 1, 1, 1], width=8)
            vision.pop("heads", None)
        else:
            vision.update(width=SMALL, layers=2, head_width=32)
    if "hf_model_name" not in text:
        text.update(width=SMALL, heads=2, layers=2)
    return cfg


def _timm_small_ok(cfg: dict[str, Any]) -> bool:
    name = cfg["vision_cfg"].get("timm_model_name")
    return name is None or bool(_timm_small_kwargs(name))


# ---- one model ---------------------------------------------------------------------------------------------
def _token_ids(text_cfg: dict[str, Any], batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    length, vocab = text_cfg.get("context_length", 77), text_cfg.get("vocab_size", 49408)
    ids = torch.randint(2, vocab - 1, (batch, length), generator=g)
    pool = text_cfg.get("pool_type", "argmax")
    if pool in ("argmax", "eos"):  # an end-of-text token, then padding
        eot = vocab - 1 if pool == "argmax" else text_cfg["eos_id"]
        ids[ids == eot] = 3
        for row, end in enumerate(torch.randint(1, length, (batch,), generator=g).tolist()):
            ids[row, end] = eot
            ids[row, end + 1 :] = 0
    return ids


def check(name: str, cfg: dict[str, Any], small: bool, seed: int = 0) -> dict[str, Any]:
    import open_clip

    import mmclip

    row: dict[str, Any] = {"name": name, "small": small}
    start = time.perf_counter()
    cfg = shrink(cfg) if small else copy.deepcopy(cfg)
    if "multimodal_cfg" in cfg:
        return row | {"status": "not supported", "why": "CoCa: a captioning decoder on top, not a dual encoder"}
    if "hf_model_name" in cfg["text_cfg"]:
        return row | {
            "status": "not supported",
            "why": f"Hugging Face text tower ({cfg['text_cfg']['hf_model_name']}): its config needs the hub",
        }
    with small_timm(small):
        model_cfg = {k: v for k, v in cfg.items() if k != "custom_text"}
        try:
            oc = (open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP)(**model_cfg)
        except Exception as e:  # noqa: BLE001
            return row | {"status": "reference failed", "why": f"open_clip: {type(e).__name__}: {e}"[:300]}
        randomize_(oc, seed)
        oc.eval()
        row["params_m"] = round(sum(p.numel() for p in oc.parameters()) / 1e6, 2)
        size = cfg["vision_cfg"].get("image_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))
        ids = _token_ids(cfg["text_cfg"], 2, seed)
        with torch.no_grad():  # open_clip's embeddings first, so that only one model is in memory at a time
            ref_image, ref_text = oc.encode_image(images, normalize=True), oc.encode_text(ids, normalize=True)
            if not (ref_image.isfinite().all() and ref_text.isfinite().all()):
                # deep full-size towers overflow with the tests' fixed weight scale: scale each weight by its fan-in
                _scale_by_fan_in_(oc)
                row["weights"] = "randomize_ scaled by 1 / sqrt(fan_in): the fixed scale overflows"
                ref_image, ref_text = oc.encode_image(images, normalize=True), oc.encode_text(ids, normalize=True)
        if not (ref_image.isfinite().all() and ref_text.isfinite().all()):
            return row | {"status": "reference failed", "why": "open_clip's embeddings are not finite"}
        with tempfile.TemporaryDirectory() as tmp:
            meta = {"model_cfg": cfg, "preprocess_cfg": {}}
            Path(tmp, "open_clip_config.json").write_text(json.dumps(meta))
            torch.save(oc.state_dict(), Path(tmp, "open_clip_pytorch_model.bin"))
            del oc
            try:
                mm = mmclip.create_model(tmp).eval()
            except (ValueError, KeyError) as e:
                return row | {"status": "not supported", "why": str(e).splitlines()[0][:300]}
            except Exception as e:  # noqa: BLE001
                return row | {"status": "failed", "why": f"{type(e).__name__}: {e}"[:300],
                              "traceback": traceback.format_exc()[-2000:]}
        if tuple(mm.data_config.image_size) != size:
            return row | {"status": "mismatch", "why": f"image size {tuple(mm.data_config.image_size)}, open_clip {size}"}
        with torch.no_grad():
            image_diff = (mm.encode_image(images, normalize=True) - ref_image).abs()
            text_diff = (mm.encode_text(ids, normalize=True) - ref_text).abs()
        if not (image_diff.isfinite().all() and text_diff.isfinite().all()):
            return row | {"status": "mismatch", "why": "mmclip's embeddings are not finite"}
    row["image_diff"], row["text_diff"] = float(image_diff.max()), float(text_diff.max())
    row["status"] = "parity" if max(row["image_diff"], row["text_diff"]) <= TOL else "mismatch"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", default="*", help="fnmatch pattern(s), comma-separated")
    parser.add_argument("--full", action="store_true", help="real sizes (default: shrunk)")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="with --full: skip models predicted to take longer (seconds)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--write-names", action="store_true",
                        help="write mmclip/assets/openclip_models.json from the small run's parity rows")
    args = parser.parse_args()
    import open_clip

    if args.write_names:
        write_names(ROOT / "benchmarks" / "results" / "openclip_zoo.json")
        return

    patterns = args.names.split(",")
    names = [n for n in open_clip.list_models() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    sizes: dict[str, int] = {}
    if args.full:  # smallest first: a sweep cut short has checked the most models
        for n in names:
            cfg = open_clip.get_model_config(n)
            supported = "multimodal_cfg" not in cfg and "hf_model_name" not in cfg["text_cfg"]
            try:
                sizes[n] = full_params(cfg) if supported else 0
            except Exception:  # noqa: BLE001  (check() reports it as "reference failed")
                sizes[n] = 0
        names.sort(key=sizes.__getitem__)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"openclip_zoo{'_full' if args.full else ''}.json")
    partial = out.with_suffix(".partial.json")
    rows: list[dict[str, Any]] = []
    for name in names:
        cfg = open_clip.get_model_config(name)
        small = not args.full and _timm_small_ok(cfg)
        if args.full and "multimodal_cfg" not in cfg and "hf_model_name" not in cfg["text_cfg"] and sizes[name]:
            params = sizes[name]
            predicted = _predicted_seconds(params)
            # fp32 weights, twice (the model and the state dict it loads), and working memory
            needed = 2.5 * 4 * params
            why = None
            if predicted > args.budget:
                why = f"over the {args.budget:.0f} s budget (about {predicted:.0f} s predicted)"
            elif needed > _available_bytes():
                why = f"over the memory ({needed / 2**30:.0f} GiB needed, {_available_bytes() / 2**30:.0f} available)"
            if why:
                rows.append({"name": name, "small": False, "status": "skipped", "params_m": round(params / 1e6, 1),
                             "why": why})
                print(f"{name:40s} skipped: {why}", flush=True)
                continue
        row = check(name, cfg, small)
        if small and row["status"] == "reference failed":  # a trunk that ignores the shrinking arguments
            small = False
            row = check(name, cfg, small)
        rows.append(row)
        partial.write_text(json.dumps({"rows": rows}, indent=1) + "\n")  # what has run, if the sweep is cut short
        diff = max(row.get("image_diff", 0.0), row.get("text_diff", 0.0))
        print(f"{name:40s} {row['status']:16s} {diff:.2e} {'small' if small else 'full'} {row.get('why', '')}",
              flush=True)
    summary: dict[str, int] = {}
    for r in rows:
        summary[r["status"]] = summary.get(r["status"], 0) + 1
    print("\n| status | architectures |\n|---|---|")
    for status, count in sorted(summary.items(), key=lambda kv: -kv[1]):
        print(f"| {status} | {count} |")
    reasons: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] != "parity":
            reasons.setdefault(r.get("why", r["status"]), []).append(r["name"])
    for why, which in reasons.items():
        print(f"- {why}: {', '.join(which)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"open_clip": open_clip.__version__, "torch": torch.__version__, "tol": TOL,
                               "summary": summary, "rows": rows}, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {out}")


def pretrained_preprocess(name: str) -> dict[str, Any]:
    """OpenCLIP's preprocessing for an architecture: that of its first pretrained tag (all of an
    architecture's tags share it), or nothing when it has none."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        return {}
    cfg = open_clip.get_pretrained_cfg(name, tags[0])
    return {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if cfg.get(k) is not None}


def write_names(results: Path) -> None:
    """mmclip names for every architecture the small run loaded with parity (built-in names excluded)."""
    import open_clip

    from mmclip.models.configs import BUILTIN_MODELS, OPENCLIP_MODELS_FILE
    from mmclip.models.convert.openclip import openclip_tokenizer, spec_from_openclip_config

    rows = json.loads(results.read_text())["rows"]
    models = {}
    for row in rows:
        name = row["name"]
        if row["status"] != "parity" or name in BUILTIN_MODELS:
            continue
        cfg = open_clip.get_model_config(name)
        entry: dict[str, Any] = {"model": spec_from_openclip_config(cfg, pretrained_preprocess(name))}
        tokenizer = openclip_tokenizer(cfg)
        if tokenizer != "clip":
            entry["tokenizer"] = tokenizer
        models[name] = entry
    doc = {"source": f"open_clip_torch {open_clip.__version__} model configs, converted by "
                     "benchmarks/openclip_zoo.py --write-names", "models": models}
    OPENCLIP_MODELS_FILE.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"wrote {len(models)} names to {OPENCLIP_MODELS_FILE}")


def _scale_by_fan_in_(module: torch.nn.Module, std: float = 0.05) -> None:
    """Rescales ``randomize_``'s matrices (std ``std``) to std ``1 / sqrt(fan_in)``: still every tensor random,
    without activations that overflow through many full-width blocks."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1:
                p.mul_(p[0].numel() ** -0.5 / std)


def full_params(cfg: dict[str, Any]) -> int:
    """The parameters of open_clip's full-size model, counted on the meta device (nothing allocated)."""
    import open_clip

    model_cfg = {k: v for k, v in cfg.items() if k != "custom_text"}
    with torch.device("meta"):
        model = (open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP)(**model_cfg)
    return sum(p.numel() for p in model.parameters())


def _predicted_seconds(params: int) -> float:
    """A rough build-and-run time for the full model on this CPU from its parameter count: the full-size rows
    of the 2-core run took 0.03-0.11 s per million parameters (init, save, load, two forwards)."""
    return params / 1e6 * 0.1


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


if __name__ == "__main__":
    main()
