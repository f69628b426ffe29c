"""Reading checkpoint files safely and fitting mmclip-layout state dicts into a model.

Files are read with ``torch.load(weights_only=True)`` or safetensors: no arbitrary pickle runs. TorchScript
archives (OpenAI's original CLIP files) are read without running their code: their tensors are unpickled
with a restricted unpickler that knows only tensor rebuilding. A state dict that does not fit raises
:class:`CheckpointError` listing the missing, unexpected, mis-shaped, non-floating and non-finite keys.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "load_checkpoint", "load_state_dict", "read_torchscript_tensors"]

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message lists missing, unexpected and mis-shaped keys."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from .safetensors, or .pt/.bin/.pth with ``torch.load(weights_only=True)``.

    ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and DDP ``module.`` prefixes are removed.
    OpenAI's original files are TorchScript archives; their parameters and buffers are read without running
    the archive's code (:func:`read_torchscript_tensors`).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: an empty, truncated or otherwise unreadable file (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes): the save or download that wrote it was interrupted; save or download "
            "it again"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Mapping = load_file(str(path))
        except SafetensorError as err:
            raise CheckpointError(
                f"cannot read {path} ({size} bytes) as safetensors: {err}. The file is truncated or corrupt "
                "(an interrupted save or download): save or download it again"
            ) from err
    elif _is_torchscript(path):
        state = read_torchscript_tensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the reason below
            if _is_truncated_zip(path):
                raise CheckpointError(
                    f"{path} ({size} bytes) is truncated or corrupt: a zip archive without its directory (an "
                    f"interrupted save or download): save or download it again ({err})"
                ) from err
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
    except (zipfile.BadZipFile, OSError):
        return False


def _is_truncated_zip(path: Path) -> bool:
    """A file that starts as a zip archive (torch.save's format) but has no readable central directory."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


# ---- TorchScript archives, read without running code ------------------------------------------------------
# An archive holds <root>/data.pkl (the module tree: objects of __torch__.* classes whose attributes are
# tensors, submodules and plain values), <root>/data/<key> (raw storages), <root>/code/ (the TorchScript
# source, which declares each class's __parameters__ and __buffers__). The unpickler below resolves only the
# globals that rebuild tensors; the module classes become inert records of their attributes.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptRecord:
    """An inert stand-in for a TorchScript class instance: its pickled attributes, nothing else."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.as_strided(size, stride, offset)


def _passthrough(value: Any, *_: Any) -> Any:
    return value


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): dict,
    **{("torch.jit._pickle", f"build_{k}list"): _passthrough for k in ("int", "double", "bool", "tensor")},
    ("torch.jit._pickle", "restore_type_tag"): _passthrough,
}


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, zf: zipfile.ZipFile, root: str, path: Path) -> None:
        super().__init__(zf.open(f"{root}/data.pkl"))
        self.zf, self.root, self.path = zf, root, path
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptRecord,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise CheckpointError(
            f"{self.path} is a TorchScript archive whose data refers to {module}.{name}, which mmclip does not "
            "read (only tensors and modules are): re-save the weights with torch.save(model.state_dict())"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.path}: unknown TorchScript storage record {pid!r}")
        if key not in self.storages:
            raw = bytearray(self.zf.read(f"{self.root}/data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self.storages[key] = flat[:numel]
        return self.storages[key]


def _declared_state(zf: zipfile.ZipFile, root: str, qualname: str) -> set[str] | None:
    """The parameter and buffer names a TorchScript class declares in the archive's code; None if unknown."""
    module, name = qualname.rsplit(".", 1)
    try:
        code = zf.read(f"{root}/code/{module.replace('.', '/')}.py").decode()
    except (KeyError, UnicodeDecodeError):
        return None
    body = re.search(rf"^class {re.escape(name)}\(.*?(?=^class |\Z)", code, re.S | re.M)
    if body is None:
        return None
    names: set[str] = set()
    found = False
    for line in re.findall(r"^\s+__(?:parameters|buffers)__ = \[(.*)\]\s*$", body.group(0), re.M):
        found = True
        names.update(re.findall(r'"([^"]*)"', line))
    return names if found else None


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (``torch.jit.save``), read without running any
    of its code or unpickling anything but tensors: keys as in the scripted module's ``state_dict()``.

    Raises:
        CheckpointError: the archive refers to anything other than tensors and modules, or is big-endian.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")), None)
        if pkl is None:
            raise CheckpointError(f"{path} is a TorchScript archive without data.pkl: it is truncated or corrupt")
        root = pkl.split("/")[0]
        if f"{root}/byteorder" in names and zf.read(f"{root}/byteorder").strip() != b"little":
            raise CheckpointError(f"{path} was saved on a big-endian machine, which mmclip does not read")
        unpickler = _TorchScriptUnpickler(zf, root, path)
        try:
            tree = unpickler.load()
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - a malformed archive
            raise CheckpointError(f"cannot read the tensors of TorchScript archive {path}: {err}") from err
        declared = {q: _declared_state(zf, root, q) for q in unpickler.classes}
    out: dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str) -> None:
        keep = declared.get(type(obj).qualname)
        for attr, value in getattr(obj, "attributes", {}).items():
            if isinstance(value, torch.Tensor) and (keep is None or attr in keep):
                out[prefix + attr] = value.clone()  # own memory (not a view of the archive's buffer)
            elif isinstance(value, _ScriptRecord):
                walk(value, f"{prefix}{attr}.")

    if not isinstance(tree, _ScriptRecord):
        raise CheckpointError(f"{path} is a TorchScript archive without a module: not a model's weights")
    walk(tree, "")
    return out


def _short(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def match_one_element_shapes(state: dict[str, Any], shapes: Mapping[str, torch.Size]) -> None:
    """In place: a one-element tensor of ``state`` takes the shape ``shapes`` gives its key when that too has one
    element. FSDP runs lift 0-d parameters (``logit_scale``, ``logit_bias``) to (1,)
    (``mmclip.tasks.strategies.lift_scalar_parameters``) and plain runs keep them 0-d; either loads into the other."""
    for key, value in state.items():
        shape = shapes.get(key)
        if shape is not None and isinstance(value, torch.Tensor) and value.shape != shape:
            if value.numel() == 1 and math.prod(shape) == 1:
                state[key] = value.reshape(shape)


def load_checkpoint(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Loads an mmclip-layout state dict, resampling ViT position embeddings to the model's grid.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped keys (listed with both shapes); integer (or bool)
            tensors where the model has floating ones; NaN or inf values (listed by key).
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
    match_one_element_shapes(state, {k: v.shape for k, v in expected.items()})
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    common = [k for k in state if k in expected and state[k].shape == expected[k].shape]
    kinds = [
        f"{k}: checkpoint {state[k].dtype} vs model {expected[k].dtype}"
        for k in common
        if expected[k].is_floating_point() and not state[k].is_floating_point()
    ]
    nonfinite = [
        k
        for k in common
        if state[k].is_floating_point()
        and bool(torch.isfinite(expected[k]).all())  # the model's own -inf masks may be saved as they are
        and not bool(torch.isfinite(state[k]).all())
    ]
    if kinds or nonfinite:
        lines = []
        if kinds:
            lines.append(
                f"{len(kinds)} non-floating tensors where the model has floating ones (quantised, integer or "
                f"corrupt weights; dequantise or convert them to float before loading): {_short(kinds)}"
            )
        if nonfinite:
            lines.append(
                f"{len(nonfinite)} tensors with NaN or inf values (saved after training diverged, or corrupt: "
                f"load an earlier checkpoint): {_short(nonfinite)}"
            )
        raise CheckpointError("checkpoint holds unusable weights:\n  " + "\n  ".join(lines))
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
