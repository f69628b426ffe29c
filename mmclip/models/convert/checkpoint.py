"""Reading checkpoint files safely and fitting mmclip-layout state dicts into a model.

Files are read with ``torch.load(weights_only=True)`` or safetensors: no arbitrary pickle runs. A state dict
that does not fit raises :class:`CheckpointError` listing the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointError", "load_checkpoint", "load_state_dict"]

logger = logging.getLogger(__name__)


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


def _short(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_checkpoint(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
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
