"""OpenAI CLIP and OpenCLIP -> mmclip: state-dict key rules and OpenCLIP model configs as mmclip specs.

The module tree is mmclip's own; foreign key layouts are translated here, never mirrored in modules.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from mmclip.models.convert.checkpoint import CheckpointError, _short

__all__ = ["convert_openclip_state_dict", "spec_from_openclip_config"]

logger = logging.getLogger(__name__)

# OpenAI checkpoints carry these as tensors; they describe the model and are not weights.
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
_NON_WEIGHTS = ("attn_mask",)


_BLOCK_RULES = [
    (r"ln_1\.", "norm1."),
    (r"ln_2\.", "norm2."),
    (r"attn\.in_proj_weight$", "attn.qkv.weight"),
    (r"attn\.in_proj_bias$", "attn.qkv.bias"),
    (r"attn\.out_proj\.", "attn.proj."),
    (r"mlp\.c_fc\.", "mlp.fc1."),
    (r"mlp\.c_proj\.", "mlp.fc2."),
    (r"ls_1\.gamma$", "gamma1"),
    (r"ls_2\.gamma$", "gamma2"),
]


def _block(rest: str) -> str:
    """'resblocks.3.ln_1.weight' -> 'blocks.3.norm1.weight'."""
    rest = re.sub(r"^resblocks\.", "blocks.", rest)
    for pattern, repl in _BLOCK_RULES:
        rest = re.sub(pattern, repl, rest)
    return rest


def _vit_key(key: str) -> str | None:
    simple = {
        "conv1.weight": "patch_embed.weight",
        "conv1.bias": "patch_embed.bias",
        "class_embedding": "cls_token",
        "positional_embedding": "pos_embed",
    }
    if key in simple:
        return "image_tower." + simple[key]
    if key == "proj":
        return "image_proj.weight"
    m = re.match(r"(ln_pre|ln_post)\.(weight|bias)$", key)
    if m:
        return f"image_tower.{'norm_pre' if m[1] == 'ln_pre' else 'norm_post'}.{m[2]}"
    if key.startswith("transformer."):
        return "image_tower.transformer." + _block(key[len("transformer.") :])
    return None


def _resnet_key(key: str) -> str | None:
    m = re.match(r"(conv|bn)([123])\.(.+)$", key)
    if m:  # stem
        kind, i, rest = m[1], m[2], m[3]
        if i == "1":
            return f"image_tower.stem.{kind}1.{rest}"
        return f"image_tower.stem.conv{i}.{'conv' if kind == 'conv' else 'bn'}.{rest}"
    m = re.match(r"layer([1-4])\.(\d+)\.(.+)$", key)
    if m:
        stage, block, rest = int(m[1]) - 1, m[2], m[3]
        sub = re.match(r"(conv|bn)([123])\.(.+)$", rest)
        if sub:
            rest = f"conv{sub[2]}.{'conv' if sub[1] == 'conv' else 'bn'}.{sub[3]}"
        else:
            rest = re.sub(r"^downsample\.0\.", "shortcut.conv.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.bn.", rest)
        return f"image_tower.stages.{stage}.{block}.{rest}"
    m = re.match(r"attnpool\.(.+)$", key)
    if m:
        rest = m[1].replace("positional_embedding", "pos_embed")
        for src, dst in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("c_proj", "out")):
            rest = re.sub(rf"^{src}\.", f"{dst}.", rest)
        return "image_tower.pool." + rest
    return None


def _timm_key(key: str) -> str | None:
    if key.startswith("trunk."):
        return "image_tower." + key
    m = re.match(r"head\.(proj|mlp)\.(.+)$", key)
    if m:
        return "image_proj." + m[2]
    return None


def _timm_vit_key(key: str) -> str | None:
    """A timm ViT trunk (OpenCLIP's SigLIP towers) into mmclip's native ``clip_vit``."""
    if not key.startswith("trunk."):
        return None
    key = key[len("trunk.") :]
    simple = {
        "patch_embed.proj.weight": "patch_embed.weight",
        "patch_embed.proj.bias": "patch_embed.bias",
        "pos_embed": "pos_embed",
        "cls_token": "cls_token",
        "attn_pool.latent": "pool.probe",
    }
    if key in simple:
        return "image_tower." + simple[key]
    m = re.match(r"(norm_pre|norm)\.(weight|bias)$", key)
    if m:
        return f"image_tower.{'norm_pre' if m[1] == 'norm_pre' else 'norm_post'}.{m[2]}"
    if key.startswith("blocks."):
        key = re.sub(r"ls([12])\.gamma$", r"gamma\1", key)
        return "image_tower.transformer." + key
    m = re.match(r"attn_pool\.(q|kv)\.(weight|bias)$", key)
    if m:  # fused below into pool.qkv
        return f"image_tower.pool.{m[1]}.{m[2]}"
    m = re.match(r"attn_pool\.(proj|norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)$", key)
    if m:
        return f"image_tower.pool.{m[1]}.{m[2]}"
    return None


def _text_key(key: str) -> str | None:
    simple = {"token_embedding.weight": "token_embed.weight", "positional_embedding": "pos_embed"}
    if key in simple:
        return "text_tower." + simple[key]
    if key in ("text_projection", "text_projection.weight"):
        return "text_proj.weight"
    if key == "text_projection.bias":
        return "text_proj.bias"
    m = re.match(r"ln_final\.(weight|bias)$", key)
    if m:
        return f"text_tower.norm_final.{m[1]}"
    if key.startswith("transformer."):
        return "text_tower.transformer." + _block(key[len("transformer.") :])
    return None


def convert_openclip_state_dict(
    state: Mapping[str, torch.Tensor], image_tower: str = "auto"
) -> dict[str, torch.Tensor]:
    """Renames an OpenAI CLIP / OpenCLIP state dict into mmclip's layout.

    Handles ViT, modified-ResNet and timm image towers and the CLIP text transformer, in both
    OpenCLIP's ``CLIP`` (text keys at the top level) and ``CustomTextCLIP`` (``text.`` prefix) layouts.
    Projections stored as (in, out) matrices are transposed into ``nn.Linear`` weights.

    Args:
        state: the checkpoint's state dict.
        image_tower: the mmclip image tower the weights go into: "auto" (the checkpoint's own kind),
            or "clip_vit" to turn an OpenCLIP timm ViT trunk (its SigLIP models) into the native ViT.

    Raises:
        CheckpointError: keys that match no rule (listed).
    """
    visual_keys = [k for k in state if k.startswith("visual.")]
    if any(k.startswith("visual.trunk.") for k in visual_keys):
        visual_rule = _timm_vit_key if image_tower == "clip_vit" else _timm_key
    elif any(k.startswith("visual.layer1.") for k in visual_keys):
        visual_rule = _resnet_key
    else:
        visual_rule = _vit_key
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _OPENAI_META_KEYS or key.rsplit(".", 1)[-1] in _NON_WEIGHTS:
            continue
        if key in ("logit_scale", "logit_bias"):
            out[key] = value
            continue
        if key.startswith("visual."):
            new = visual_rule(key[len("visual.") :])
        else:
            new = _text_key(key[len("text.") :] if key.startswith("text.") else key)
        if new is None:
            unknown.append(key)
            continue
        if key.endswith(("visual.proj", "text_projection")):  # (in, out) parameter -> Linear weight
            value = value.t()
        if new in ("image_tower.cls_token", "image_tower.pos_embed") and value.ndim == 3:
            value = value.reshape(-1) if new.endswith("cls_token") else value[0]  # timm keeps a batch dim
        out[new] = value
    for param in ("weight", "bias"):  # timm's latent attention pool: separate q and kv -> fused qkv
        q_key, kv_key = f"image_tower.pool.q.{param}", f"image_tower.pool.kv.{param}"
        if kv_key in out:  # (the modified ResNet's attention pool has q, k, v of its own: left alone)
            out[f"image_tower.pool.qkv.{param}"] = torch.cat([out.pop(q_key), out.pop(kv_key)], dim=0)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} checkpoint keys match no OpenAI/OpenCLIP layout mmclip knows: "
            f"{_short(unknown)}. Is this a checkpoint of a different architecture?"
        )
    return out


# ---- OpenCLIP model configs (``open_clip_config.json``) -> mmclip specs ------------------------------------
_VISION_IGNORED = {"output_tokens", "timm_model_pretrained", "pos_embed_type"}
_TEXT_IGNORED = {"output_tokens", "hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode"}


def _meta_trunk(model_name: str) -> Any:
    import timm

    with torch.device("meta"):  # no memory, no init
        return timm.create_model(model_name, pretrained=False, num_classes=0)


def _native_vit(model_name: str) -> bool:
    """Whether a timm model is a plain ViT mmclip's ``clip_vit`` reproduces (timm's VisionTransformer with
    standard blocks, no rotary embeddings or registers)."""
    from timm.models.vision_transformer import Block, VisionTransformer

    trunk = _meta_trunk(model_name)
    return (
        type(trunk) is VisionTransformer
        and all(type(b) is Block for b in trunk.blocks)
        and not getattr(trunk, "num_reg_tokens", 0)
        and getattr(trunk.patch_embed, "proj", None) is not None
    )


def _timm_vit_shape(model_name: str) -> dict[str, Any]:
    """Width, depth, heads, patch, MLP ratio and activation of a timm ViT, read off a meta-device instance."""
    trunk = _meta_trunk(model_name)
    block = trunk.blocks[0]
    act = block.mlp.act
    kind = type(act).__name__
    if kind == "GELU" and getattr(act, "approximate", "none") == "tanh" or kind == "GELUTanh":
        act_name = "gelu_tanh"
    elif kind in ("GELU", "QuickGELU"):
        act_name = {"GELU": "gelu", "QuickGELU": "quick_gelu"}[kind]
    else:
        raise ValueError(f"{model_name}'s MLP activation {kind} has no mmclip equivalent")
    return {
        "width": trunk.embed_dim,
        "layers": len(trunk.blocks),
        "heads": block.attn.num_heads,
        "patch_size": trunk.patch_embed.patch_size[0],
        "mlp_ratio": block.mlp.fc1.out_features / trunk.embed_dim,
        "act": act_name,
    }


def _vision_spec(cfg: dict[str, Any], act: str, embed_dim: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(image tower spec, DualEncoder arguments) for an OpenCLIP ``vision_cfg``."""
    cfg = {k: v for k, v in cfg.items() if k not in _VISION_IGNORED}
    size = cfg.pop("image_size", 224)
    timm_name = cfg.pop("timm_model_name", None)
    if timm_name is not None:
        pool, proj = cfg.pop("timm_pool", "avg"), cfg.pop("timm_proj", "linear")
        drop, drop_path = cfg.pop("timm_drop", 0.0), cfg.pop("timm_drop_path", None)
        proj_bias = bool(cfg.pop("timm_proj_bias", False))
        _no_keys_left(cfg, "vision_cfg")
        if timm_name.startswith("vit_") and pool == "map" and proj == "none" and _native_vit(timm_name):
            # a SigLIP-style timm ViT: mmclip's native ViT holds it
            spec = {"name": "clip_vit", "image_size": size, **_timm_vit_shape(timm_name)}
            spec.update(class_token=False, patch_bias=True, pre_norm=False, pool="map", ln_eps=1e-6)
            return spec, {"image_proj": "none"}
        if drop:
            raise ValueError(f"timm_drop={drop} has no mmclip equivalent (timm towers take drop_path)")
        if pool in ("abs_attn", "rot_attn"):
            raise ValueError(f"timm_pool={pool!r} (OpenCLIP's own attention pools on timm trunks) has no mmclip equivalent")
        spec = {"name": "timm", "model_name": timm_name, "image_size": size}
        if drop_path is not None:
            spec["drop_path"] = drop_path
        if proj in ("linear", "mlp"):  # the trunk's head removed; OpenCLIP resets its pool only when one is named
            if pool:
                spec["pool"] = pool
            return spec, {"image_proj": proj, "image_proj_bias": proj_bias}
        if proj not in (None, "", "none"):
            raise ValueError(f"timm_proj={proj!r} is not supported; OpenCLIP has 'linear', 'mlp', 'none' and None")
        spec["pool"] = pool  # created with this pool; None: the trunk's own classifier is the projection
        if proj is None or proj == "":
            spec["num_classes"] = embed_dim
        return spec, {"image_proj": "none"}
    layers = cfg.pop("layers")
    width = cfg.pop("width", 64)
    if isinstance(layers, (list, tuple)):
        heads = cfg.pop("heads", None)
        cfg.pop("patch_size", None)
        _no_keys_left(cfg, "vision_cfg")
        spec = {"name": "clip_resnet", "layers": list(layers), "width": width, "output_dim": embed_dim}
        spec["image_size"] = size
        if heads is not None:
            spec["heads"] = heads
        return spec, {"image_proj": "none"}
    spec = {
        "name": "clip_vit",
        "image_size": size,
        "patch_size": cfg.pop("patch_size"),
        "width": width,
        "layers": layers,
        "heads": width // cfg.pop("head_width", 64),
        "mlp_ratio": cfg.pop("mlp_ratio", 4.0),
        "act": act,
    }
    if cfg.pop("no_ln_pre", False):
        spec["pre_norm"] = False
    ls = cfg.pop("ls_init_value", None)
    if ls is not None:
        spec["layer_scale_init"] = ls
    if cfg.pop("patch_dropout", 0.0):
        spec["patch_dropout"] = 0.0  # a training option: set it on the task
    pool = cfg.pop("pool_type", "tok")
    if pool != "tok":
        spec["pool"] = {"avg": "mean"}.get(pool, pool)
    if cfg.pop("final_ln_after_pool", False):
        spec["norm_after_pool"] = True
    _no_keys_left(cfg, "vision_cfg")
    return spec, {}


def _text_spec(cfg: dict[str, Any], act: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(text tower spec, DualEncoder arguments) for an OpenCLIP ``text_cfg``."""
    tokenizer_kwargs = cfg.get("tokenizer_kwargs")
    if cfg.get("tokenizer_mode"):
        raise ValueError(f"OpenCLIP tokenizer_mode={cfg['tokenizer_mode']!r} has no mmclip tokenizer")
    cfg = {k: v for k, v in cfg.items() if k not in _TEXT_IGNORED}
    if "hf_model_name" in cfg:
        raise ValueError(
            f"OpenCLIP configs with a Hugging Face text tower ({cfg['hf_model_name']}) are not converted yet; "
            "build the model from an mmclip spec with a text_tower of name 'hf'"
        )
    width = cfg.pop("width", 512)
    spec = {
        "name": "clip_text",
        "vocab_size": cfg.pop("vocab_size", 49408),
        "context_length": cfg.pop("context_length", 77),
        "width": width,
        "heads": cfg.pop("heads", 8),
        "layers": cfg.pop("layers", 12),
        "mlp_ratio": cfg.pop("mlp_ratio", 4.0),
        "act": act,
    }
    extra: dict[str, Any] = {}
    act_kwargs = cfg.pop("act_kwargs", None) or {}
    if act_kwargs:
        if act_kwargs != {"approximate": "tanh"} or act != "gelu":
            raise ValueError(f"OpenCLIP text_cfg.act_kwargs={act_kwargs} has no mmclip activation")
        spec["act"] = "gelu_tanh"  # SigLIP 2
    if cfg.pop("no_causal_mask", False):
        spec["causal"] = False
    pool = cfg.pop("pool_type", "argmax")
    eos_id = cfg.pop("eos_id", None)
    if pool == "eos":  # the first end-of-text id
        if eos_id is None:
            raise ValueError("OpenCLIP text_cfg pool_type 'eos' needs an eos_id")
        spec.update(pool="eot", eot_token_id=int(eos_id))
    else:
        spec["pool"] = pool
    if pool == "last":  # SigLIP's tokenizers pad (and end) with id 1; BERT's (CLIPA, its [SEP] stripped) with 0
        pad = 0 if (tokenizer_kwargs or {}).get("strip_sep_token") else 1
        spec.update(pad_token_id=pad, eot_token_id=pad)
    proj_type = cfg.pop("proj_type", "linear")
    if proj_type == "none":
        extra["text_proj"] = "none"
    elif proj_type != "linear":
        raise ValueError(f"OpenCLIP text_cfg.proj_type={proj_type!r} is not supported ('linear' or 'none')")
    eps = cfg.pop("norm_kwargs", {}).get("eps")
    if eps is not None:
        spec["ln_eps"] = eps
    if cfg.pop("proj_bias", False):
        extra["text_proj_bias"] = True
    if cfg.pop("embed_cls", False):
        raise ValueError("OpenCLIP option text_cfg.embed_cls (CoCa) has no mmclip equivalent")
    _no_keys_left(cfg, "text_cfg")
    return spec, extra


def _no_keys_left(cfg: dict[str, Any], where: str) -> None:
    if cfg:
        raise ValueError(f"OpenCLIP {where} keys mmclip cannot express: {sorted(cfg)}")


def spec_from_openclip_config(
    model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An mmclip ``DualEncoder`` spec from an OpenCLIP model config (``open_clip_config.json``'s
    ``model_cfg``, or a file of ``open_clip/model_configs``), reproducing OpenCLIP's forward exactly.

    Args:
        model_cfg: ``{"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"?, "init_logit_bias"?, ...}``.
        preprocess_cfg: OpenCLIP's ``preprocess_cfg`` (mean, std, interpolation, resize_mode), if any.

    Raises:
        ValueError: an option mmclip cannot express (named), e.g. CoCa's multimodal decoder.
    """
    cfg = dict(model_cfg)
    if "multimodal_cfg" in cfg:
        raise ValueError("CoCa models (multimodal_cfg) are not dual encoders mmclip can build")
    act = "quick_gelu" if cfg.pop("quick_gelu", False) else "gelu"
    embed_dim = cfg.pop("embed_dim")
    image, image_extra = _vision_spec(dict(cfg.pop("vision_cfg")), act, embed_dim)
    text, text_extra = _text_spec(dict(cfg.pop("text_cfg")), act)
    spec: dict[str, Any] = {"image_tower": image, "text_tower": text, "embed_dim": embed_dim}
    spec.update(image_extra, **text_extra)
    if "init_logit_bias" in cfg:
        spec["init_logit_bias"] = float(cfg.pop("init_logit_bias"))
    if "init_logit_scale" in cfg:
        spec["init_logit_scale"] = float(cfg.pop("init_logit_scale"))
    cfg.pop("custom_text", None)
    _no_keys_left(cfg, "model config")
    pre = dict(preprocess_cfg or {})
    for key in ("mean", "std"):
        if key in pre:
            image[key] = tuple(pre[key])
    if "interpolation" in pre:
        image["interpolation"] = pre["interpolation"]
    if pre.get("resize_mode") and image["name"] in ("clip_vit", "timm"):
        image["resize_mode"] = pre["resize_mode"]
    return spec


def openclip_tokenizer(model_cfg: dict[str, Any]) -> str | dict[str, Any]:
    """The tokenizer source of an OpenCLIP model config: CLIP's BPE ("clip"), or its Hugging Face tokenizer
    with OpenCLIP's options (``{"name": id, "clean": ..., "strip_sep_token": ...}``; OpenCLIP cleans
    whitespace unless the config says otherwise)."""
    text = model_cfg.get("text_cfg", {})
    name = text.get("hf_tokenizer_name")
    if not name:
        return "clip"
    options = dict(text.get("tokenizer_kwargs") or {})
    unknown = sorted(set(options) - {"clean", "strip_sep_token"})
    if unknown:
        raise ValueError(f"OpenCLIP tokenizer_kwargs {unknown} have no mmclip equivalent")
    return {"name": name, "clean": options.get("clean", "whitespace"), **options}
