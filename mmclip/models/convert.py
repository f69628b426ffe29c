"""Checkpoint files -> mmclip state dicts, for OpenAI CLIP and OpenCLIP checkpoints.

The module tree is mmclip's own; foreign key layouts are translated here, never mirrored in modules.
Files are read with ``torch.load(weights_only=True)`` or safetensors: no arbitrary pickle runs.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from mmclip.models.dual_encoder import DualEncoder

__all__ = [
    "CheckpointError",
    "load_state_dict",
    "convert_openclip_state_dict",
    "load_checkpoint",
    "load_pretrained_into",
]

logger = logging.getLogger(__name__)

# OpenAI checkpoints carry these as tensors; they describe the model and are not weights.
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
_NON_WEIGHTS = ("attn_mask",)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message lists missing, unexpected and mis-shaped keys."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from .safetensors, or .pt/.bin/.pth with ``torch.load(weights_only=True)``.

    ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and DDP ``module.`` prefixes are removed.
    OpenAI's original files are TorchScript archives; their tensors are read through ``torch.jit.load``,
    TorchScript's own restricted loader (no Python pickle runs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Mapping = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the reason below
            if _is_torchscript(path):
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            else:
                raise CheckpointError(
                    f"cannot read {path} as a weights-only checkpoint ({err}). mmclip never unpickles "
                    "arbitrary objects: re-save the weights with torch.save(model.state_dict()) or safetensors"
                ) from err
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key[len("module.") :] if key.startswith("module.") else key] = value
    return out


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


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


def _short(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_checkpoint(model: DualEncoder, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Loads an mmclip-layout state dict, resampling ViT position embeddings to the model's grid.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped keys (listed with both shapes).
    """
    from mmclip.towers.image.clip_vit import ClipVisionTransformer, resample_pos_embed

    state = dict(state)
    tower = model.image_tower
    key = "image_tower.pos_embed"
    if (
        isinstance(tower, ClipVisionTransformer)
        and key in state
        and state[key].shape != tower.pos_embed.shape
    ):
        old = state[key].shape
        state[key] = resample_pos_embed(state[key], tower.grid_size, tower.num_prefix)
        logger.info("resampled image position embeddings %s -> %s", tuple(old), tuple(state[key].shape))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        lines = []
        if shapes:
            lines.append(f"{len(shapes)} shape mismatches: {_short(shapes)}")
        if missing:
            lines.append(f"{len(missing)} missing keys: {_short(missing)}")
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected keys: {_short(unexpected)}")
        raise CheckpointError(
            "checkpoint does not fit the model (is it for another architecture or config?):\n  "
            + "\n  ".join(lines)
        )
    model.load_state_dict(state, strict=strict)


def load_pretrained_into(model: DualEncoder, pretrained: str | Path) -> DualEncoder:
    """Loads weights from an OpenAI/OpenCLIP file or an mmclip / Hugging Face directory into ``model``."""
    path = Path(pretrained)
    if path.is_dir():
        from mmclip.models.hf_interop import from_pretrained

        source = from_pretrained(path)
        load_checkpoint(model, source.state_dict())
        return model
    state = load_state_dict(path)
    if any(k.startswith(("image_tower.", "text_tower.")) for k in state):
        converted = state  # already mmclip's layout
    else:
        from mmclip.towers.image.clip_vit import ClipVisionTransformer

        target = "clip_vit" if isinstance(model.image_tower, ClipVisionTransformer) else "auto"
        converted = convert_openclip_state_dict(state, image_tower=target)
        if "input_resolution" in state:
            acts = {type(m).__name__ for m in model.modules()}
            if "QuickGELU" not in acts:
                logger.warning("OpenAI weights were trained with QuickGELU; use the '-quickgelu' model name")
    load_checkpoint(model, converted)
    return model
