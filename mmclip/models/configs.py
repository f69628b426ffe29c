"""Named model configs (OpenCLIP's names and mmclip's tiny test configs): the table, ``list_models`` and
``get_model_config``. Each entry is a ``DualEncoder`` spec; :data:`MODEL_TOKENIZERS` says which tokenizer a
named model uses when it is not CLIP's."""

from __future__ import annotations

import copy
import fnmatch
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MODEL_CONFIGS", "MODEL_TOKENIZERS", "get_model_config", "list_models", "register_model_config"]

MODEL_CONFIGS: dict[str, dict[str, Any]] = {}


#: tokenizer of a named model, where it is not CLIP's BPE ("clip"): a hub id or directory for HFTokenizer.
MODEL_TOKENIZERS: dict[str, str | dict[str, Any]] = {}


def register_model_config(
    name: str, config: dict[str, Any], tokenizer: str | dict[str, Any] | None = None
) -> None:
    """Adds a named config (a ``DualEncoder`` spec) and, optionally, its tokenizer. Duplicate names raise."""
    if name in MODEL_CONFIGS:
        raise ValueError(f"model config {name!r} already exists")
    MODEL_CONFIGS[name] = config
    if tokenizer is not None:
        MODEL_TOKENIZERS[name] = tokenizer


def _text(width: int, layers: int = 12, **kw: Any) -> dict[str, Any]:
    return {"name": "clip_text", "width": width, "heads": width // 64, "layers": layers, **kw}


def _vit(image_size: int, patch: int, width: int, layers: int, **kw: Any) -> dict[str, Any]:
    return {
        "name": "clip_vit",
        "image_size": image_size,
        "patch_size": patch,
        "width": width,
        "layers": layers,
        "heads": width // 64,
        **kw,
    }


def _resnet(layers: tuple[int, ...], width: int, embed: int, image_size: int) -> dict[str, Any]:
    return {
        "name": "clip_resnet",
        "layers": list(layers),
        "width": width,
        "output_dim": embed,
        "image_size": image_size,
    }


def _register_builtins() -> None:
    # OpenAI CLIP: (image tower, text width, embed dim). Text: 12 layers, heads = width / 64.
    vits = {
        "ViT-B-32": (_vit(224, 32, 768, 12), 512, 512),
        "ViT-B-16": (_vit(224, 16, 768, 12), 512, 512),
        "ViT-L-14": (_vit(224, 14, 1024, 24), 768, 768),
        "ViT-L-14-336": (_vit(336, 14, 1024, 24), 768, 768),
    }
    resnets = {
        "RN50": (_resnet((3, 4, 6, 3), 64, 1024, 224), 512, 1024),
        "RN101": (_resnet((3, 4, 23, 3), 64, 512, 224), 512, 512),
        "RN50x4": (_resnet((4, 6, 10, 6), 80, 640, 288), 640, 640),
        "RN50x16": (_resnet((6, 8, 18, 8), 96, 768, 384), 768, 768),
        "RN50x64": (_resnet((3, 15, 36, 10), 128, 1024, 448), 1024, 1024),
    }
    for name, (image, text_width, embed) in {**vits, **resnets}.items():
        proj = "none" if image["name"] == "clip_resnet" else "linear"
        for suffix, act in (("", "gelu"), ("-quickgelu", "quick_gelu")):
            img = dict(image, act=act) if image["name"] == "clip_vit" else dict(image)
            register_model_config(
                name + suffix,
                {
                    "image_tower": img,
                    "text_tower": _text(text_width, act=act),
                    "embed_dim": embed,
                    "image_proj": proj,
                },
            )

    siglip_text = {
        "vocab_size": 32000,
        "context_length": 64,
        "causal": False,
        "pool": "last",
        "act": "gelu_tanh",
        "ln_eps": 1e-6,
        "pad_token_id": 1,
        "eot_token_id": 1,
    }
    siglip_image = {
        "class_token": False,
        "patch_bias": True,
        "pre_norm": False,
        "pool": "map",
        "act": "gelu_tanh",
        "ln_eps": 1e-6,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "resize_mode": "squash",
    }
    siglip = {
        "image_proj": "none",
        "text_proj_bias": True,
        "init_logit_scale": math.log(10.0),
        "init_logit_bias": -10.0,
    }
    register_model_config(
        "ViT-B-16-SigLIP",
        {
            "image_tower": _vit(224, 16, 768, 12, **siglip_image),
            "text_tower": _text(768, **siglip_text),
            "embed_dim": 768,
            **siglip,
        },
        tokenizer="timm/ViT-B-16-SigLIP",
    )
    register_model_config(
        "convnext_base",
        {
            "image_tower": {
                "name": "timm",
                "model_name": "convnext_base",
                "image_size": 224,
                "drop_path": 0.1,
            },
            "text_tower": _text(512),
            "embed_dim": 512,
        },
    )
    register_model_config(
        "efficientnet_b3",
        {
            "image_tower": {"name": "timm", "model_name": "efficientnet_b3", "image_size": 288},
            "text_tower": _text(512),
            "embed_dim": 512,
        },
    )
    register_model_config(
        "ViT-B-32-BERT",
        {
            "image_tower": _vit(224, 32, 768, 12),
            "text_tower": {"name": "hf", "config": {"model_type": "bert"}, "pool": "cls"},
            "embed_dim": 512,
        },
    )

    # Tiny configs for tests and the CPU demo.
    tiny_text = _text(64, layers=2, heads=2)
    register_model_config(
        "tiny-vit", {"image_tower": _vit(32, 8, 64, 2, heads=2), "text_tower": tiny_text, "embed_dim": 32}
    )
    register_model_config(
        "tiny-vit-quickgelu",
        {
            "image_tower": _vit(32, 8, 64, 2, heads=2, act="quick_gelu"),
            "text_tower": dict(tiny_text, act="quick_gelu"),
            "embed_dim": 32,
        },
    )
    register_model_config(
        "tiny-resnet",
        {
            "image_tower": _resnet((1, 1, 1, 1), 8, 32, 64),
            "text_tower": tiny_text,
            "embed_dim": 32,
            "image_proj": "none",
        },
    )
    register_model_config(
        "tiny-convnext",
        {
            "image_tower": {"name": "timm", "model_name": "test_convnext", "image_size": 64},
            "text_tower": tiny_text,
            "embed_dim": 32,
        },
    )
    register_model_config(
        "tiny-efficientnet",
        {
            "image_tower": {"name": "timm", "model_name": "test_efficientnet", "image_size": 64},
            "text_tower": tiny_text,
            "embed_dim": 32,
        },
    )
    register_model_config(
        "tiny-bert",
        {
            "image_tower": _vit(32, 8, 64, 2, heads=2),
            "text_tower": {
                "name": "hf",
                "pool": "cls",
                "config": {
                    "model_type": "bert",
                    "vocab_size": 1000,
                    "hidden_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "intermediate_size": 128,
                    "max_position_embeddings": 77,
                },
            },
            "embed_dim": 32,
        },
    )
    register_model_config(  # SigLIP 2 NaFlex in small: native aspect ratio, up to 16 patches of 8 px
        "tiny-naflex",
        {
            "image_tower": {"name": "naflex_vit", "patch_size": 8, "width": 64, "layers": 2, "heads": 2,
                            "pos_grid": 4, "max_num_patches": 16},
            "text_tower": _text(64, layers=2, heads=2, **dict(siglip_text, vocab_size=1000)),
            "embed_dim": 64,
            **siglip,
        },
    )
    register_model_config(
        "tiny-siglip",
        {
            "image_tower": _vit(32, 8, 64, 2, heads=2, **siglip_image),
            "text_tower": _text(64, layers=2, heads=2, **dict(siglip_text, vocab_size=1000)),
            "embed_dim": 64,
            **siglip,
        },
    )


_register_builtins()
BUILTIN_MODELS = frozenset(MODEL_CONFIGS)
#: OpenCLIP's architectures as mmclip specs, written by ``benchmarks/openclip_zoo.py --write-names``
OPENCLIP_MODELS_FILE = Path(__file__).resolve().parents[1] / "assets" / "openclip_models.json"


def _register_openclip_models() -> None:
    """Every OpenCLIP architecture mmclip loads with parity and does not build in above, under OpenCLIP's name."""
    if not OPENCLIP_MODELS_FILE.is_file():
        return
    for name, entry in json.loads(OPENCLIP_MODELS_FILE.read_text())["models"].items():
        if name not in MODEL_CONFIGS:
            register_model_config(name, entry["model"], entry.get("tokenizer"))


_register_openclip_models()


def list_models(pattern: str = "*") -> list[str]:
    """Names of the named configs matching a shell-style pattern."""
    return sorted(n for n in MODEL_CONFIGS if fnmatch.fnmatchcase(n, pattern))


def get_model_config(name: str) -> dict[str, Any]:
    """A deep copy of a named config; unknown names raise a KeyError listing the known ones."""
    if name not in MODEL_CONFIGS:
        import difflib

        close = difflib.get_close_matches(name, list(MODEL_CONFIGS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} Known: {', '.join(list_models())}")
    return copy.deepcopy(MODEL_CONFIGS[name])
