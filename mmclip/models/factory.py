"""The one model resolver: any model source -> a ``DualEncoder``, its weights and its tokenizer.

A *model source* is any of

- a named config (``"ViT-B-32"``, see ``list_models()``) or a spec dict (``{"image_tower": {...},
  "text_tower": {...}, ...}``), optionally with ``pretrained=`` weights;
- an mmclip directory (``save_pretrained``), a Hugging Face ``CLIPModel`` / ``SiglipModel`` directory, an
  OpenCLIP directory (``open_clip_config.json`` + ``open_clip_model.safetensors``);
- a Hugging Face hub id (``"openai/clip-vit-base-patch32"``) or an OpenCLIP hub repo
  (``"hf-hub:timm/ViT-B-16-SigLIP"``), fetched through ``huggingface_hub``'s cache (offline when cached);
- a Lightning training checkpoint (``.ckpt``, or the directory of a sharded one) of a task that holds a dual
  encoder;
- a ``DualEncoder`` instance.

:func:`resolve_model` turns a source into a :class:`ResolvedModel` (architecture spec, where its weights
are, which tokenizer it uses) without building anything; :func:`create_model` builds and loads it. Every
entry point (tasks, ``mmclip eval | embed | search | caption``) goes through these, so every source works
everywhere. Overrides merge into the spec by one rule (:func:`merge_config`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmclip.models.configs import MODEL_CONFIGS, MODEL_TOKENIZERS, get_model_config, list_models
from mmclip.models.dual_encoder import CONFIG_NAME, WEIGHTS_NAME, DualEncoder

__all__ = [
    "ResolvedModel",
    "count_parameters",
    "create_model",
    "create_model_and_transforms",
    "describes_architecture",
    "model_overrides",
    "from_pretrained",
    "get_tokenizer",
    "load_weights",
    "merge_config",
    "resolve_model",
    "weights_file_state",
]

logger = logging.getLogger(__name__)

OPENCLIP_CONFIG = "open_clip_config.json"
_OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "vocab.txt")
SHARDED_META = "meta.pt"  # Lightning's sharded checkpoints keep everything but the tensors there
CHECKPOINT_MODEL_KEY = "mmclip_model"  # what a task writes into its Lightning checkpoints to be a source


@dataclass
class ResolvedModel:
    """What a model source describes, before anything is built.

    Attributes:
        config: the ``DualEncoder`` spec (``DualEncoder.from_config``), overrides merged in.
        weights: where the weights are (a path, hub id or ``hf-hub:`` repo for :func:`load_weights`), or
            None for random init.
        tokenizer: the tokenizer source for ``mmclip.tokenizers.get_tokenizer`` ("clip", a directory or a
            hub id).
        kind: "named", "spec", "mmclip", "hf", "openclip", "checkpoint" or "instance".
        instance: the model itself, for kind "instance".
    """

    config: dict[str, Any] | None
    weights: str | None
    tokenizer: str | dict[str, Any]
    kind: str
    instance: DualEncoder | None = None


def merge_config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The one merge rule for model specs: nested dicts merge key by key, other values replace.

    A tower spec (``image_tower`` / ``text_tower``) whose ``name`` differs from the base tower's replaces it
    whole; one without a ``name`` (or with the same name) refines it, e.g. ``image_tower={"patch_dropout": 0.5}``.
    """
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        if key in ("image_tower", "text_tower") and isinstance(value, dict) and isinstance(old, dict):
            if "name" in value and value["name"] != old.get("name"):
                out[key] = dict(value)
                continue
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = merge_config(old, value)
        else:
            out[key] = value
    return out


def model_overrides(
    model_kwargs: dict[str, Any] | None = None,
    image_tower: dict[str, Any] | None = None,
    text_tower: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The overrides a task or recipe gives a model source: DualEncoder arguments, with tower refinements
    inside them (a model recipe's own) refined again by the tower groups, empty ones left out."""
    towers = {"image_tower": dict(image_tower or {}), "text_tower": dict(text_tower or {})}
    return {k: v for k, v in merge_config(dict(model_kwargs or {}), towers).items() if v != {}}


# ---- locating a source ----------------------------------------------------------------------------------
def _hub_snapshot(repo: str) -> Path:
    """The local folder of a hub repo's model files (downloaded once, then read from the cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - a dependency of transformers
        raise ImportError("loading from the Hugging Face hub needs huggingface_hub") from err
    try:
        return Path(snapshot_download(repo, allow_patterns=_HUB_FILES))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated: one clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "it is not in the local hub cache and HF_HUB_OFFLINE is set: download it once with network access"
            if offline
            else "check the repo id and your network / token"
        )
        raise FileNotFoundError(
            f"{repo!r} is no local file or directory, and the Hugging Face hub repo of that name cannot be had "
            f"({type(err).__name__}: {err}); {hint}, or pass a local directory instead"
        ) from err


def _is_sharded_checkpoint(path: Path) -> bool:
    """A sharded Lightning checkpoint (``trainer=fsdp``): ``torch.distributed.checkpoint`` shards + ``meta.pt``."""
    return (path / SHARDED_META).is_file() and (path / ".metadata").is_file()


def _dir_kind(path: Path) -> str | None:
    from mmclip.models.convert.hf import is_hf_model_dir

    if _is_sharded_checkpoint(path):
        return "checkpoint"
    if (path / CONFIG_NAME).is_file():
        return "mmclip"
    if (path / OPENCLIP_CONFIG).is_file():
        return "openclip"
    if is_hf_model_dir(path):
        return "hf"
    return None


def _locate(source: str | os.PathLike[str]) -> tuple[str, Path | None]:
    """(kind, local path) of a string source; kind "named" has no path."""
    text = os.fspath(source)
    if text.startswith("hf-hub:"):
        path = _hub_snapshot(text[len("hf-hub:") :])
        if not (path / OPENCLIP_CONFIG).is_file():
            raise FileNotFoundError(f"{text} has no {OPENCLIP_CONFIG}: 'hf-hub:' names an OpenCLIP repo")
        return "openclip", path
    path = Path(text).expanduser()
    if path.is_dir():
        kind = _dir_kind(path)
        if kind is None:
            raise FileNotFoundError(
                f"{path} is not a model directory: expected {CONFIG_NAME} (mmclip save_pretrained), "
                f"{OPENCLIP_CONFIG} (OpenCLIP) or config.json (Hugging Face CLIP / SigLIP)"
            )
        return kind, path
    if path.is_file():
        if path.suffix == ".ckpt":
            return "checkpoint", path
        return "file", path
    if text in MODEL_CONFIGS:
        return "named", None
    if _is_hub_id(text):
        path = _hub_snapshot(text)
        kind = _dir_kind(path)
        if kind is None:
            raise FileNotFoundError(f"hub repo {text!r} holds no mmclip, OpenCLIP or Hugging Face model config")
        return kind, path
    import difflib

    close = difflib.get_close_matches(text, list(MODEL_CONFIGS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise KeyError(
        f"unknown model source {text!r}: not a named model, an existing file or directory, a hub id "
        f"('org/name') or an 'hf-hub:' repo.{hint} Named models: {', '.join(list_models())}"
    )


def describes_architecture(source: Any) -> bool:
    """Whether a source names its own architecture (a model directory, hub id, ``hf-hub:`` repo or
    ``.ckpt``), as opposed to a named config, a spec or a bare weights file."""
    if isinstance(source, DualEncoder):
        return True
    if not isinstance(source, str | os.PathLike):
        return False
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir() or path.suffix == ".ckpt" or text.startswith("hf-hub:"):
        return True
    return text not in MODEL_CONFIGS and _is_hub_id(text)


def _is_hub_id(text: str) -> bool:
    """'org/name' that is not a local path: a Hugging Face hub repo id."""
    path = Path(text).expanduser()
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix and not path.exists()


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def _read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint directory as one checkpoint dict: ``meta.pt`` plus the model's shards gathered in
    this process (no process group needed)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = full["model"]
    return checkpoint


def _read_checkpoint(path: Path) -> dict[str, Any]:
    from mmclip.models.convert.checkpoint import CheckpointError

    try:
        if path.is_dir():
            checkpoint = _read_sharded_checkpoint(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file and the fix
        raise CheckpointError(
            f"cannot read {path} as a weights-only Lightning checkpoint ({err}); mmclip never unpickles "
            "arbitrary objects"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def _checkpoint_model(checkpoint: dict[str, Any], path: Path) -> tuple[dict[str, Any], str]:
    """(DualEncoder spec, tokenizer source) recorded in a task checkpoint."""
    from mmclip.models.convert.checkpoint import CheckpointError

    info = checkpoint.get(CHECKPOINT_MODEL_KEY)
    if isinstance(info, dict) and info.get("config") is not None:
        return info["config"], info.get("tokenizer") or "clip"
    hp = checkpoint.get("hyper_parameters", {})
    if isinstance(hp.get("model"), str) and hp["model"] in MODEL_CONFIGS:  # checkpoints of mmclip <= 0.1
        config = get_model_config(hp["model"])
        kwargs = dict(hp.get("model_kwargs") or {})
        for key in ("image_tower", "text_tower"):
            if hp.get(key):
                kwargs[key] = merge_config(kwargs.get(key, {}), hp[key])
        return merge_config(config, kwargs), hp.get("tokenizer") or "clip"
    if isinstance(info, dict):
        raise CheckpointError(
            f"{path} was trained with a DualEncoder built in code from tower instances, so it does not record "
            "how to rebuild it: build the same model in code and load the 'model.*' weights with "
            "ContrastiveTask.load_from_checkpoint(path, model=your_model)"
        )
    raise CheckpointError(
        f"{path} does not hold a dual encoder (no '{CHECKPOINT_MODEL_KEY}' entry): give a ContrastiveTask "
        "checkpoint, or the model source the task was built from"
    )


# ---- resolving ------------------------------------------------------------------------------------------
def resolve_model(source: Any, pretrained: Any = None, **overrides: Any) -> ResolvedModel:
    """What ``source`` describes (see the module docstring), without building it.

    Args:
        source: a model source.
        pretrained: weights to load instead of the source's own (any source with weights, or an OpenAI /
            OpenCLIP / mmclip weights file for a named model or spec).
        **overrides: DualEncoder arguments merged into the spec by :func:`merge_config`.

    Raises:
        KeyError: an unknown name (the known ones are listed).
        FileNotFoundError: a path or hub repo that holds no model.
        ValueError: a weights file given as the source (it does not say its architecture).
    """
    if isinstance(source, DualEncoder):
        if overrides:
            raise ValueError(f"overrides {sorted(overrides)} cannot change a model instance; pass a source or spec")
        return ResolvedModel(source.config, _str(pretrained), "clip", "instance", instance=source)
    if isinstance(source, dict):
        config, weights, tokenizer, kind = dict(source), None, _spec_tokenizer(source), "spec"
    elif source is None:
        raise ValueError("a model source is needed: a named model (see `mmclip models`), spec, directory or hub id")
    else:
        kind, path = _locate(source)
        weights = os.fspath(source)
        if kind == "named":
            config, weights = get_model_config(str(source)), None
            tokenizer = MODEL_TOKENIZERS.get(str(source), "clip")
        elif kind == "mmclip":
            meta = json.loads((path / CONFIG_NAME).read_text())
            config = meta["model"]
            tokenizer = meta.get("tokenizer") or (str(path) if _has_tokenizer_files(path) else "clip")
        elif kind == "hf":
            from mmclip.models.convert.hf import hf_spec

            config = hf_spec(path)
            tokenizer = str(path) if _has_tokenizer_files(path) else "clip"
        elif kind == "openclip":
            from mmclip.models.convert.openclip import openclip_tokenizer, spec_from_openclip_config

            meta = json.loads((path / OPENCLIP_CONFIG).read_text())
            config = spec_from_openclip_config(meta["model_cfg"], meta.get("preprocess_cfg"))
            tokenizer = openclip_tokenizer(meta["model_cfg"])
        elif kind == "checkpoint":
            config, tokenizer = _checkpoint_model(_read_checkpoint(path), path)
        else:
            raise ValueError(
                f"{path} is a weights file, which does not say its architecture: give the architecture and "
                f"the file, e.g. create_model('ViT-B-32', pretrained='{path}') (see `mmclip models`)"
            )
    if pretrained is not None:
        weights = _str(pretrained)
    return ResolvedModel(merge_config(config, overrides), weights, tokenizer, kind)


def _str(source: Any) -> str | None:
    return None if source is None else os.fspath(source)


def _spec_tokenizer(spec: dict[str, Any]) -> str:
    text = spec.get("text_tower") or {}
    if text.get("name") == "hf" and text.get("model_name_or_path"):
        return str(text["model_name_or_path"])
    return "clip"


# ---- weights --------------------------------------------------------------------------------------------
def weights_file_state(
    path: str | os.PathLike[str], image_tower: str = "auto", quick_gelu: bool | None = None
) -> dict[str, torch.Tensor]:
    """The mmclip-layout state dict of an OpenAI / OpenCLIP / mmclip weights file.

    Args:
        path: the file.
        image_tower: what OpenCLIP image weights go into (see ``convert_openclip_state_dict``).
        quick_gelu: whether the receiving model runs QuickGELU (False warns on OpenAI's files), or None.
    """
    from mmclip.models.convert.checkpoint import load_state_dict
    from mmclip.models.convert.openclip import convert_openclip_state_dict

    state = load_state_dict(path)
    if any(k.startswith(("image_tower.", "text_tower.")) for k in state):
        return state  # already mmclip's layout
    if "input_resolution" in state and quick_gelu is False:
        logger.warning("OpenAI weights were trained with QuickGELU; use the '-quickgelu' model name")
    return convert_openclip_state_dict(state, image_tower=image_tower)


def _model_file_state(model: DualEncoder, path: Path) -> dict[str, torch.Tensor]:
    from mmclip.towers.image.clip_vit import ClipVisionTransformer

    target = "clip_vit" if isinstance(model.image_tower, ClipVisionTransformer) else "auto"
    quick_gelu = "QuickGELU" in {type(m).__name__ for m in model.modules()}
    return weights_file_state(path, image_tower=target, quick_gelu=quick_gelu)


def state_dict_of(source: str | os.PathLike[str], model: DualEncoder) -> dict[str, torch.Tensor]:
    """The mmclip-layout state dict of a weights source, for ``model``'s architecture."""
    from mmclip.models.convert.checkpoint import load_state_dict

    kind, path = _locate(source)
    if kind == "mmclip":
        return load_state_dict(path / WEIGHTS_NAME)
    if kind == "hf":
        from mmclip.models.convert.hf import hf_state_dict

        return hf_state_dict(path)
    if kind == "openclip":
        files = [path / name for name in _OPENCLIP_WEIGHTS if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"{path} has no {' or '.join(_OPENCLIP_WEIGHTS)}")
        return _model_file_state(model, files[0])
    if kind == "checkpoint":
        checkpoint = _read_checkpoint(path)
        state = checkpoint["state_dict"]
        prefix = (checkpoint.get(CHECKPOINT_MODEL_KEY) or {}).get("weights", "model.")  # EMA weights when kept
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if kind == "file":
        return _model_file_state(model, path)
    raise ValueError(
        f"{source!r} is a named model, not weights: pretrained takes a file, a directory, a hub id or a "
        "checkpoint (mmclip has no table of pretrained tags)"
    )


def load_weights(
    model: DualEncoder, source: str | os.PathLike[str], keep: tuple[str, ...] | list[str] = ()
) -> DualEncoder:
    """Loads the weights of any source with weights into ``model`` (strict, listing every misfit key).

    Args:
        model: the model.
        source: a weights file, directory, hub id, ``hf-hub:`` repo or ``.ckpt``.
        keep: parameters the source may lack, which then keep the model's values (e.g. a logit bias a
            sigmoid loss added to a CLIP model).

    Raises:
        CheckpointError: missing, unexpected or mis-shaped keys.
    """
    from mmclip.models.convert.checkpoint import load_checkpoint

    state = state_dict_of(source, model)
    own = model.state_dict()
    for key in keep:
        state.setdefault(key, own[key])
    load_checkpoint(model, state)
    logger.info("loaded weights from %s", source)
    return model


# ---- building -------------------------------------------------------------------------------------------
def create_model(
    source: Any,
    pretrained: Any = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> DualEncoder:
    """Builds the ``DualEncoder`` a model source describes, with its weights.

    Args:
        source: a named model, spec dict, mmclip / HF / OpenCLIP directory, hub id, ``hf-hub:`` repo,
            ``.ckpt`` training checkpoint or ``DualEncoder`` (see the module docstring).
        pretrained: weights to load (an OpenAI / OpenCLIP / mmclip weights file, or any source above).
        device: where to put the model.
        **overrides: DualEncoder arguments; dicts merge into the spec, e.g.
            ``create_model("ViT-B-16", image_tower={"patch_dropout": 0.5})``.

    Examples:
        >>> model = create_model("tiny-vit")                        # random init
        >>> model = create_model("ViT-B-32-quickgelu", pretrained="ViT-B-32.pt")  # doctest: +SKIP
        >>> model = create_model("hf-hub:timm/ViT-B-16-SigLIP")     # doctest: +SKIP
    """
    resolved = resolve_model(source, pretrained, **overrides)
    model = resolved.instance or DualEncoder.from_config(resolved.config)
    if resolved.weights is not None:
        load_weights(model, resolved.weights)
    if device is not None:
        model = model.to(device)
    return model


def from_pretrained(source: str | os.PathLike[str]) -> DualEncoder:
    """A model with its weights from a self-describing source (directory, hub id, ``.ckpt``):
    ``create_model(source)``."""
    return create_model(source)


def get_tokenizer(source: Any = "clip", context_length: int | None = None) -> Any:
    """The tokenizer of any model source, or a tokenizer by name / directory / hub id.

    ``get_tokenizer("ViT-B-32")`` equals OpenCLIP's tokenizer for that model. The default row length is the
    smaller of the tokenizer's own limit and the text tower's positions.

    Args:
        source: a model source (see :func:`create_model`), or "clip", a tokenizer directory or hub id.
        context_length: row length; default as above.
    """
    from mmclip.tokenizers import get_tokenizer as load_tokenizer

    resolved = _resolve_for_tokenizer(source)
    if resolved is None:
        return load_tokenizer(source, context_length=context_length)
    if context_length is None:
        context_length = text_context_length(resolved.config)
    return load_tokenizer(resolved.tokenizer, context_length=context_length)


def _resolve_for_tokenizer(source: Any) -> ResolvedModel | None:
    if source is None or isinstance(source, str) and source.lower() == "clip":
        return None
    if isinstance(source, dict) and "name" in source and not {"image_tower", "text_tower"} & set(source):
        return None  # tokenizer options ({"name": ..., "clean": ...}), not a model spec
    if isinstance(source, DualEncoder | dict):
        return resolve_model(source)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir() and _dir_kind(path) is None:
        return None  # a tokenizer directory
    if text in MODEL_CONFIGS or path.exists() or text.startswith("hf-hub:"):
        return resolve_model(text)
    if _is_hub_id(text):
        try:
            return resolve_model(text)
        except FileNotFoundError:
            return None  # a tokenizer-only hub repo: the tokenizer loader says what went wrong
    return None


def text_context_length(config: dict[str, Any] | None) -> int | None:
    """The text tower's position limit in a spec (None: the tokenizer's own default)."""
    text = (config or {}).get("text_tower") or {}
    if text.get("name") == "clip_text":
        return int(text.get("context_length", 77))
    return None


def create_model_and_transforms(
    source: Any, pretrained: Any = None, device: str | torch.device | None = None, **overrides: Any
) -> tuple[DualEncoder, Any, Any]:
    """``(model, train_preprocess, preprocess)`` as OpenCLIP users know it.

    ``preprocess(pil_image)`` gives the tower's input ``(3, H, W)`` (resize, crop, normalise exactly as the
    reference the weights came from), or for a NaFlex tower (SigLIP 2) the image's patches at its own aspect
    ratio; ``mmclip.collate_images`` batches either kind. ``train_preprocess`` adds the training augmentation
    (a random resized crop; a NaFlex tower's keeps each image's aspect ratio).
    """
    from mmclip.data.transforms import image_transform

    model = create_model(source, pretrained, device=device, **overrides)
    return model, image_transform(model.data_config, train=True), image_transform(model.data_config, train=False)


def count_parameters(model: DualEncoder) -> dict[str, int]:
    """Parameter counts, split as in the CLIP paper's tables.

    ``image`` is the image tower plus its projection (OpenAI's ``visual`` module), ``text`` the text
    tower's embeddings, blocks and final norm (without the text projection), ``total`` everything.
    """

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "total": n(model),
        "image": n(model.image_tower) + n(model.image_proj),
        "text": n(model.text_tower),
    }
