"""``mmclip eval``: evaluates any model source (a named model + weights file, a directory, hub id or
training checkpoint) on data sets."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mmclip.cli.recipe import RECIPES_DIR, import_user_modules, model_from_recipe, plain

__all__ = ["load_model", "run_eval"]

log = logging.getLogger("mmclip")


def load_model(cfg: DictConfig) -> tuple[Any, Any]:
    """The ``(DualEncoder, tokenizer)`` an eval / embed recipe names (see ``model_from_recipe``)."""
    import_user_modules(cfg)
    return model_from_recipe(cfg)


def run_eval(cfg: DictConfig) -> dict[str, float]:
    """Evaluates as ``recipes/eval.yaml`` describes; writes ``cfg.output`` (JSON) and returns the metrics."""
    from hydra.utils import instantiate

    from mmclip.evaluation import evaluate

    model, tokenizer = load_model(cfg)
    model = model.to(cfg.device).eval()
    datamodule = instantiate(cfg.data)  # evaluate() configures it with the model's data_config and tokenizer
    metrics = evaluate(model, tokenizer, datamodule, tasks=tuple(cfg.tasks), device=cfg.device)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"metrics": metrics, "config": plain(cfg)}, indent=2, default=str))
    log.info("metrics written to %s", out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``mmclip eval [OVERRIDES...]``: prints a table and writes the JSON file."""
    import sys

    import hydra

    @hydra.main(version_base="1.3", config_path=str(RECIPES_DIR), config_name="eval")
    def _run(cfg: DictConfig) -> None:
        from rich.console import Console

        from mmclip.evaluation import results_table

        Console().print(results_table(run_eval(cfg), title=f"mmclip eval: {cfg.name}"))

    sys.argv = [str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
    _run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
