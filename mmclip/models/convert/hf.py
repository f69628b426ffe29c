"""Hugging Face ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` directories <-> mmclip configs and state dicts.

Loading reads the directory's config with transformers (defaults included) and its weights with
safetensors (or ``torch.load(weights_only=True)`` for ``pytorch_model.bin``); no HF model is built.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from mmclip.models.convert.checkpoint import CheckpointError, load_state_dict
from mmclip.models.dual_encoder import DualEncoder

__all__ = ["export_hf", "hf_spec", "hf_state_dict", "is_hf_model_dir", "to_hf_clip"]

_ACTS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
}
_ACTS_BACK = {"QuickGELU": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "ReLU": "relu"}


def _act(name: str) -> str:
    if name not in _ACTS:
        raise ValueError(f"activation {name!r} has no mmclip equivalent; supported: {sorted(_ACTS)}")
    return _ACTS[name]


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(directory / name)))
        return state
    if (directory / "pytorch_model.bin").is_file():
        return load_state_dict(directory / "pytorch_model.bin")
    raise FileNotFoundError(f"no model.safetensors, sharded index or pytorch_model.bin in {directory}")


def _preprocessing(directory: Path, default_mean: tuple, default_std: tuple) -> dict[str, Any]:
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return {"mean": default_mean, "std": default_std}
    cfg = json.loads(path.read_text())
    return {
        "mean": tuple(cfg.get("image_mean", default_mean)),
        "std": tuple(cfg.get("image_std", default_std)),
    }


# ---- key mapping: (HF regex, mmclip template) pairs for one direction; blocks handled separately ------------
_CLIP_KEYS = [
    (r"text_model\.embeddings\.token_embedding\.weight", "text_tower.token_embed.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "text_tower.pos_embed"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"text_tower.norm_final.\1"),
    (r"vision_model\.embeddings\.class_embedding", "image_tower.cls_token"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"image_tower.patch_embed.\1"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "image_tower.pos_embed"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"image_tower.norm_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"image_tower.norm_post.\1"),
    (r"visual_projection\.weight", "image_proj.weight"),
    (r"text_projection\.weight", "text_proj.weight"),
    (r"logit_scale", "logit_scale"),
    (r"logit_bias", "logit_bias"),
]
_SIGLIP_KEYS = (
    _CLIP_KEYS[:3]
    + _CLIP_KEYS[4:6]
    + [
        (r"vision_model\.post_layernorm\.(weight|bias)", r"image_tower.norm_post.\1"),
        (r"vision_model\.head\.probe", "image_tower.pool.probe"),
        (r"vision_model\.head\.attention\.in_proj_(weight|bias)", r"image_tower.pool.qkv.\1"),
        (r"vision_model\.head\.attention\.out_proj\.(weight|bias)", r"image_tower.pool.proj.\1"),
        (r"vision_model\.head\.layernorm\.(weight|bias)", r"image_tower.pool.norm.\1"),
        (r"vision_model\.head\.mlp\.(fc1|fc2)\.(weight|bias)", r"image_tower.pool.mlp.\1.\2"),
        (r"text_model\.head\.(weight|bias)", r"text_proj.\1"),
        (r"logit_scale", "logit_scale"),
        (r"logit_bias", "logit_bias"),
    ]
)
_MODEL_TYPES = "'clip', 'siglip' and 'siglip2'"
_LAYER = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)")


def _hf_layer(key: str) -> tuple[str, str, str] | None:
    """'vision_model.encoder.layers.3.self_attn.q_proj.weight' -> ('image_tower...blocks.3.', 'self_attn.q_proj', 'weight')."""
    m = _LAYER.fullmatch(key)
    if m is None:
        return None
    tower = "image_tower" if m[1] == "vision" else "text_tower"
    part, _, param = m[3].rpartition(".")
    return f"{tower}.transformer.blocks.{m[2]}.", part, param


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LAYER_PARTS = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _convert_hf_state(
    state: dict[str, torch.Tensor], table: list[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        layer = _hf_layer(key)
        if layer:
            prefix, part, param = layer
            if part in _QKV:
                qkv.setdefault((prefix, param), {})[part[-6]] = value
            elif part in _LAYER_PARTS:
                out[prefix + _LAYER_PARTS[part] + "." + param] = value
            else:
                unknown.append(key)
            continue
        for pattern, template in table:
            if re.fullmatch(pattern, key):
                new = re.sub(pattern, template, key)
                if new in ("logit_scale", "logit_bias"):
                    value = value.reshape(())
                if new == "image_tower.pool.probe":
                    value = value.reshape(1, 1, -1)
                out[new] = value
                break
        else:
            unknown.append(key)
    for (prefix, param), parts in qkv.items():
        out[f"{prefix}attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        raise CheckpointError(f"{len(unknown)} Hugging Face keys have no mmclip counterpart: {unknown[:12]}")
    return out


def _siglip2_vision_spec(config: Any, max_num_patches: int, mean: Any, std: Any) -> dict[str, Any]:
    """The ``naflex_vit`` spec of a ``Siglip2VisionConfig``."""
    grid = math.isqrt(config.num_patches)
    if grid * grid != config.num_patches:
        raise ValueError(f"Siglip2 num_patches={config.num_patches} is not a square position grid")
    return {
        "name": "naflex_vit",
        "patch_size": config.patch_size,
        "width": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "act": _act(config.hidden_act),
        "ln_eps": config.layer_norm_eps,
        "pos_grid": grid,
        "max_num_patches": max_num_patches,
        "in_chans": config.num_channels,
        "mean": tuple(mean),
        "std": tuple(std),
    }


def is_hf_model_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a Hugging Face model config (``config.json`` with a ``model_type``)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    try:
        return "model_type" in json.loads(path.read_text())
    except ValueError:
        return False


def hf_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a HF ``CLIPModel`` / ``SiglipModel`` directory in mmclip's layout."""
    model_type = json.loads((Path(directory) / "config.json").read_text()).get("model_type")
    table = {"clip": _CLIP_KEYS, "siglip": _SIGLIP_KEYS, "siglip2": _SIGLIP_KEYS}.get(model_type)
    if table is None:
        raise ValueError(f"model_type {model_type!r} is not supported; mmclip reads {_MODEL_TYPES}")
    return _convert_hf_state(_read_hf_weights(Path(directory)), table)


def hf_spec(directory: str | Path) -> dict[str, Any]:
    """The mmclip ``DualEncoder`` spec of a HF ``CLIPModel`` / ``SiglipModel`` directory (config only)."""
    from transformers import AutoConfig

    directory = Path(directory)
    config = AutoConfig.from_pretrained(str(directory))
    if config.model_type not in ("clip", "siglip", "siglip2"):
        raise ValueError(f"model_type {config.model_type!r} is not supported; mmclip reads {_MODEL_TYPES}")
    v, t = config.vision_config, config.text_config
    if config.model_type == "siglip2":  # NaFlex: no fixed image size, a position grid resized per image
        pre = _preprocessing(directory, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        path = directory / "preprocessor_config.json"
        budget = json.loads(path.read_text()).get("max_num_patches", 256) if path.is_file() else 256
        image = _siglip2_vision_spec(v, budget, pre["mean"], pre["std"])
    else:
        image = {
            "name": "clip_vit",
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "width": v.hidden_size,
            "layers": v.num_hidden_layers,
            "heads": v.num_attention_heads,
            "in_chans": v.num_channels,
            "mlp_ratio": v.intermediate_size / v.hidden_size,
            "act": _act(v.hidden_act),
            "ln_eps": v.layer_norm_eps,
        }
    text = {
        "name": "clip_text",
        "vocab_size": t.vocab_size,
        "context_length": t.max_position_embeddings,
        "width": t.hidden_size,
        "layers": t.num_hidden_layers,
        "heads": t.num_attention_heads,
        "mlp_ratio": t.intermediate_size / t.hidden_size,
        "act": _act(t.hidden_act),
        "ln_eps": t.layer_norm_eps,
    }
    if config.model_type == "clip":
        from mmclip.towers.base import OPENAI_MEAN, OPENAI_STD

        image.update(_preprocessing(directory, OPENAI_MEAN, OPENAI_STD))
        # transformers pools CLIP text at argmax(ids) for legacy configs (eos id 2), else at the first eos.
        pool = {"pool": "argmax"} if t.eos_token_id == 2 else {"pool": "eot", "eot_token_id": t.eos_token_id}
        text.update(pool, pad_token_id=t.pad_token_id if t.pad_token_id is not None else 0)
        cfg = {
            "image_tower": image,
            "text_tower": text,
            "embed_dim": config.projection_dim,
            "init_logit_scale": float(config.logit_scale_init_value),
        }
        return cfg
    if config.model_type in ("siglip", "siglip2"):
        if not getattr(v, "vision_use_head", True):
            raise ValueError("SigLIP vision towers without the attention-pooling head are not supported")
        if config.model_type == "siglip":
            image.update(
                _preprocessing(directory, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                class_token=False,
                patch_bias=True,
                pre_norm=False,
                pool="map",
                resize_mode="squash",
            )
        text.update(
            causal=False,
            pool="last",
            pad_token_id=t.pad_token_id if t.pad_token_id is not None else 1,
            eot_token_id=t.eos_token_id if t.eos_token_id is not None else 1,
        )
        embed = getattr(t, "projection_size", None) or t.hidden_size
        if v.hidden_size != embed:
            raise ValueError(f"SigLIP vision width {v.hidden_size} differs from the text projection {embed}")
        cfg = {
            "image_tower": image,
            "text_tower": text,
            "embed_dim": embed,
            "image_proj": "none",
            "text_proj_bias": True,
            "init_logit_scale": math.log(10.0),
            "init_logit_bias": -10.0,
        }
        return cfg
    raise AssertionError("unreachable")


def _check_exportable(model: DualEncoder) -> None:
    from torch import nn

    from mmclip.towers.image.clip_vit import ClipVisionTransformer
    from mmclip.towers.text.clip_text import ClipTextTransformer

    img, txt = model.image_tower, model.text_tower
    problems = []
    if not isinstance(img, ClipVisionTransformer) or img.cls_token is None or img.pool_type != "cls":
        problems.append("the image tower must be a clip_vit with a class token and cls pooling")
    elif img.patch_embed.bias is not None or not isinstance(img.norm_pre, nn.LayerNorm):
        problems.append("the image tower must have ln_pre and no patch bias")
    elif img.transformer.blocks[0].gamma1 is not None:
        problems.append("layer scale has no HF CLIP equivalent")
    if not isinstance(txt, ClipTextTransformer) or not txt.causal or txt.pool_type not in ("argmax", "eot"):
        problems.append("the text tower must be a causal clip_text pooled at end-of-text")
    for name, proj in (("image_proj", model.image_proj), ("text_proj", model.text_proj)):
        if not isinstance(proj, nn.Linear) or proj.bias is not None:
            problems.append(f"{name} must be a linear projection without bias")
    if model.logit_bias is not None:
        problems.append("HF CLIPModel has no logit bias")
    if isinstance(img, ClipVisionTransformer) and img.image_size[0] != img.image_size[1]:
        problems.append(f"HF CLIPModel needs square images, not {img.image_size}")
    if problems:
        raise ValueError("model cannot be exported as a HF CLIPModel: " + "; ".join(problems))


def _act_name(block: Any) -> str:
    act = block.mlp.act
    key = type(act).__name__
    if key == "GELU":
        key = "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return _ACTS_BACK[key]


def to_hf_clip(model: DualEncoder) -> Any:
    """Builds a transformers ``CLIPModel`` holding this model's weights (CLIP architectures only)."""
    from transformers import CLIPConfig, CLIPModel

    _check_exportable(model)
    img, txt = model.image_tower, model.text_tower
    vb, tb = img.transformer.blocks[0], txt.transformer.blocks[0]
    config = CLIPConfig(
        text_config={
            "vocab_size": txt.vocab_size,
            "hidden_size": txt.width,
            "intermediate_size": tb.mlp.fc1.out_features,
            "num_attention_heads": tb.attn.heads,
            "num_hidden_layers": len(txt.transformer.blocks),
            "max_position_embeddings": txt.context_length,
            "hidden_act": _act_name(tb),
            "layer_norm_eps": tb.norm1.eps,
            "eos_token_id": 2 if txt.pool_type == "argmax" else txt.eot_token_id,
            "pad_token_id": txt.pad_token_id,
            "bos_token_id": 49406 if txt.vocab_size == 49408 else 0,
        },
        vision_config={
            "hidden_size": img.width,
            "intermediate_size": vb.mlp.fc1.out_features,
            "num_attention_heads": vb.attn.heads,
            "num_hidden_layers": len(img.transformer.blocks),
            "image_size": img.image_size[0],
            "patch_size": img.patch_size,
            "hidden_act": _act_name(vb),
            "layer_norm_eps": vb.norm1.eps,
            "num_channels": img.patch_embed.in_channels,
        },
        projection_dim=model.embed_dim,
        logit_scale_init_value=float(model.logit_scale.detach()),
    )
    hf = CLIPModel(config)
    hf_keys = [k for k in hf.state_dict() if not k.endswith("position_ids")]
    ours = model.state_dict()
    state = {}
    for key in hf_keys:
        layer = _hf_layer(key)
        if layer:
            prefix, part, param = layer
            if part in _QKV:
                i = "qkv".index(part[-6])
                state[key] = ours[f"{prefix}attn.qkv.{param}"].chunk(3, dim=0)[i]
            else:
                state[key] = ours[prefix + _LAYER_PARTS[part] + "." + param]
            continue
        for pattern, template in _CLIP_KEYS:
            if re.fullmatch(pattern, key):
                state[key] = ours[re.sub(pattern, template, key)].reshape(hf.state_dict()[key].shape)
                break
        else:
            raise CheckpointError(f"HF key {key} has no mmclip counterpart")
    full = hf.state_dict()
    full.update(state)
    hf.load_state_dict(full)
    return hf.eval()


def export_hf(model: DualEncoder, directory: str | Path, tokenizer: Any = None) -> Path:
    """Saves the model as a Hugging Face ``CLIPModel`` directory that ``CLIPProcessor`` reads too.

    Writes config.json + model.safetensors, preprocessor_config.json, and the tokenizer files, so
    ``CLIPProcessor.from_pretrained(directory)`` gives mmclip's ids and pixels.

    Args:
        model: a CLIP-architecture DualEncoder.
        directory: output folder.
        tokenizer: the model's tokenizer (a ``ClipTokenizer`` or ``HFTokenizer``); default CLIP's BPE at
            the text tower's context length.

    Raises:
        ValueError: the model has no HF CLIP equivalent, or the tokenizer's vocabulary does not fit it.
    """
    from mmclip.tokenizers import ClipTokenizer, HFTokenizer

    directory = Path(directory)
    hf_model = to_hf_clip(model)
    if tokenizer is None:
        tokenizer = ClipTokenizer(context_length=model.text_tower.context_length)
    if tokenizer.vocab_size > model.text_tower.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the text tower embeds {model.text_tower.vocab_size}: "
            "pass the tokenizer the model was trained with (export_hf(model, dir, tokenizer=...))"
        )
    hf_model.save_pretrained(str(directory))
    if isinstance(tokenizer, ClipTokenizer):
        tokenizer.save_hf(directory)
    elif isinstance(tokenizer, HFTokenizer):
        tokenizer.tokenizer.save_pretrained(str(directory))
    else:
        raise TypeError(f"export_hf writes ClipTokenizer or HFTokenizer files, not {type(tokenizer).__name__}")
    cfg = model.image_tower.data_config
    (directory / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": list(cfg.mean),
                "image_std": list(cfg.std),
                "size": {"shortest_edge": cfg.image_size[0]},
                "crop_size": {"height": cfg.image_size[0], "width": cfg.image_size[1]},
                "do_center_crop": True,
                "do_resize": True,
                "do_normalize": True,
                "resample": 3,
                "image_processor_type": "CLIPImageProcessor",
            },
            indent=2,
        )
    )
    return directory
