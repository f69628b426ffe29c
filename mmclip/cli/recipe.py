"""What every recipe command shares: where the recipes are, composing them, user imports, and the model a
recipe's ``model`` / tower nodes (and ``checkpoint``) name."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["RECIPES_DIR", "compose", "import_user_modules", "model_from_recipe", "plain", "recipes_dir"]

log = logging.getLogger("mmclip")


def recipes_dir() -> Path:
    """``MMCLIP_RECIPES`` if set, else the recipes shipped in the wheel (``mmclip/recipes``), else the
    repository's top-level ``recipes/`` (editable installs)."""
    env = os.environ.get("MMCLIP_RECIPES")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    shipped = package / "recipes"
    return shipped if shipped.is_dir() else package.parent / "recipes"


RECIPES_DIR = recipes_dir()


def plain(node: Any) -> Any:
    """A plain Python container (no OmegaConf nodes cross into the library or a checkpoint)."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Composes a recipe with hydra overrides, outside ``@hydra.main`` (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not RECIPES_DIR.is_dir():
        raise FileNotFoundError(
            f"recipes folder {RECIPES_DIR} not found: set MMCLIP_RECIPES to the repository's recipes/ folder"
        )
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)


def import_user_modules(cfg: DictConfig) -> None:
    """Imports the modules a recipe's ``imports`` key lists (user towers, losses, tasks register themselves
    on import). The working directory is searched too, as ``python -m`` would."""
    modules = list(cfg.get("imports") or [])
    if not modules:
        return
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(str(name))
        except ImportError as err:
            raise ImportError(
                f"recipe key imports names {name!r}, which cannot be imported ({err}); give a module on the "
                "Python path or in the working directory, e.g. imports=[my_pkg.towers]"
            ) from err
        log.info("imported %s", name)


def model_from_recipe(cfg: DictConfig) -> tuple[Any, Any]:
    """``(DualEncoder, tokenizer)`` from a recipe's ``model`` group (``name``: any model source,
    ``kwargs``, ``tokenizer``, ``context_length``), ``image_tower`` / ``text_tower`` refinements and
    ``checkpoint``.

    A ``checkpoint`` that describes its own architecture (a directory, hub id or ``.ckpt``) is the model
    source, and the recipe's model nodes are not used; a weights file loads into the model group's
    architecture.
    """
    from mmclip.models.factory import create_model, describes_architecture, get_tokenizer, model_overrides

    node = plain(cfg.model) or {}
    checkpoint = cfg.get("checkpoint")
    overrides = model_overrides(node.get("kwargs"), plain(cfg.get("image_tower")), plain(cfg.get("text_tower")))
    source, pretrained = node.get("name"), checkpoint
    from_checkpoint = bool(checkpoint) and describes_architecture(str(checkpoint))
    if from_checkpoint:
        source, pretrained, overrides = str(checkpoint), None, {}
        log.info("model: %s (architecture, weights and tokenizer from the checkpoint)", checkpoint)
    elif source is None:  # no source: the tower groups are the model
        source = {k: overrides.pop(k) for k in ("image_tower", "text_tower") if k in overrides}
    model = create_model(source, pretrained=pretrained, **overrides)
    tokenizer = source if from_checkpoint or not node.get("tokenizer") else node["tokenizer"]
    length = node.get("context_length") or getattr(model.text_tower, "context_length", None)
    return model, get_tokenizer(tokenizer, context_length=length)
