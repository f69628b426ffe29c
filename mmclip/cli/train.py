"""``mmclip train``: a thin hydra wrapper around the plain :func:`train` function.

``train(cfg)`` takes a composed root recipe (``train``, ``featurize``, ``caption``, ...), imports the
recipe's ``imports``, instantiates every ``_target_`` node (the task, the data module, callbacks, loggers,
the trainer's strategy), runs ``Trainer.fit`` and, when ``report`` is set, writes the report folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmclip.cli.recipe import RECIPES_DIR, compose, import_user_modules, plain

__all__ = ["RECIPES_DIR", "build_task", "build_trainer", "compose", "train"]

log = logging.getLogger("mmclip")

def build_task(cfg: DictConfig) -> Any:
    """The LightningModule a root recipe's ``task`` node (``_target_``) describes, with plain arguments."""
    from hydra.utils import instantiate

    import_user_modules(cfg)
    return instantiate(cfg.task, _convert_="all")


def build_trainer(cfg: DictConfig, callbacks: list[Any] | None = None, loggers: list[Any] | None = None) -> Any:
    """``pl.Trainer`` from the recipe's ``trainer`` node, every ``_target_`` in it (the strategy) instantiated.

    Raises:
        RuntimeError: a sharded (FSDP) strategy without CUDA GPUs.
    """
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate

    kwargs = instantiate(cfg.trainer, _convert_="all")
    strategy = kwargs.get("strategy")
    if _is_a(strategy, "FSDPStrategy", "ModelParallelStrategy") and not torch.cuda.is_available():
        raise RuntimeError(
            "trainer=fsdp shards the model over CUDA GPUs (NCCL), and this machine has none: use "
            "trainer=cpu here, or trainer=ddp for data parallel on several processes"
        )
    plugins = kwargs.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    if _wants_atomic_checkpoints(strategy, plugins):
        from mmclip.tasks.checkpoint_io import AtomicCheckpointIO

        plugins.append(AtomicCheckpointIO())
    return pl.Trainer(**kwargs, plugins=plugins or None, callbacks=callbacks or [], logger=loggers or False)


def _wants_atomic_checkpoints(strategy: Any, plugins: list[Any]) -> bool:
    """Whether ``build_trainer`` adds :class:`~mmclip.tasks.checkpoint_io.AtomicCheckpointIO`: not when the
    recipe names a checkpoint IO plugin, the strategy was given one, or the strategy writes sharded
    checkpoints through ``torch.distributed.checkpoint`` (FSDP ``state_dict_type="sharded"``, model
    parallel) rather than through a checkpoint IO."""
    from lightning.fabric.plugins import CheckpointIO

    if any(isinstance(p, CheckpointIO) for p in plugins):
        return False
    if getattr(strategy, "_checkpoint_io", None) is not None:
        return False
    if _is_a(strategy, "FSDPStrategy") and getattr(strategy, "_state_dict_type", "full") == "sharded":
        return False
    if _is_a(strategy, "ModelParallelStrategy") and getattr(strategy, "_save_distributed_checkpoint", True):
        return False
    return True


def _is_a(strategy: Any, *names: str) -> bool:
    """Whether the strategy is one of Lightning's ``names`` or a subclass (``fsdp_strategy`` builds one),
    without importing strategies a recipe does not use."""
    return any(cls.__name__ in names for cls in type(strategy).__mro__)


def _instantiate_all(node: Any) -> list[Any]:
    """Every ``_target_`` entry of a callbacks / logger node, instantiated. An entry without one (an
    experiment's setting for a callback the chosen group lacks, e.g. under ``callbacks=none``) is skipped
    with a warning naming it."""
    from hydra.utils import instantiate

    out = []
    for key, value in (node or {}).items():
        if value is None:
            continue
        if "_target_" not in value:
            log.warning("skipping %s: no such callback or logger in the chosen group, only settings for it", key)
            continue
        out.append(instantiate(value))
    return out


def _route_lightning_logs() -> None:
    """Lightning's loggers print through their own handler; under hydra the root handler (console and the
    run's log file) already shows them, so drop Lightning's to avoid every line printed twice."""
    root = logging.getLogger()
    if not root.handlers:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs the training a composed recipe describes; returns the final metrics (and the report path).

    Args:
        cfg: the composed ``train`` recipe.
    """
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    _route_lightning_logs()
    import_user_modules(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = build_task(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if hasattr(task, "report"):
            trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
            log.info("task: %s (%.2fM trainable parameters)", type(task).__name__, trainable / 1e6)
            log.info("data: %s", datamodule.describe())
        else:
            _log_summary(task, datamodule)
    ckpt_path = cfg.get("resume")
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    _save_final_last(trainer)
    results: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("report") and trainer.is_global_zero:
        if hasattr(task, "report"):  # tasks other than the contrastive one evaluate themselves
            report = task.report(datamodule, run_dir / "report")
        else:
            from mmclip.evaluation.report import write_report

            thresholds = plain(cfg.get("thresholds")) or {}
            report = write_report(task, datamodule, run_dir / "report", loggers=loggers, cfg=cfg, thresholds=thresholds)
        results.update(report["metrics"])
        results["report_dir"] = report["dir"]
        results["report_passed"] = report["passed"]
        _print_report(report)
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def _save_final_last(trainer: Any) -> None:
    """Makes ``last.ckpt`` hold the final step.

    Lightning writes ``last.ckpt`` when a periodic checkpoint fires, and at the end of fit only if none ever
    did, so a run whose last step is not a multiple of ``every_n_train_steps`` would leave it behind the
    final weights. Called on every rank (the save is collective under FSDP; rank 0 writes).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    if trainer.fast_dev_run or trainer.global_step == 0:
        return
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            if getattr(cb, "_last_global_step_saved", None) != trainer.global_step:
                trainer.save_checkpoint(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
            return


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console

    from mmclip.evaluation import results_table

    console = Console()
    console.print(results_table(report["metrics"], title="evaluation after training"))
    for key, (value, target, ok) in report["checks"].items():
        shown = "missing" if value is None else f"{value:.3f}"
        console.print(f"{'[green]pass' if ok else '[red]FAIL'}[/] {key} = {shown} (target >= {target})")
    console.print(f"report: {report['dir']}/summary.md")


def _log_summary(task: Any, datamodule: Any) -> None:
    from mmclip.models.factory import count_parameters

    counts = count_parameters(task.model)
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    dc = task.model.data_config
    log.info(
        "model: image %s (%.2fM) + text %s (%.2fM), embed %d, trainable %.2fM of %.2fM; input %s",
        type(task.model.image_tower).__name__,
        counts["image"] / 1e6,
        type(task.model.text_tower).__name__,
        counts["text"] / 1e6,
        task.model.embed_dim,
        trainable / 1e6,
        counts["total"] / 1e6,
        f"at most {dc.extra['naflex']['max_num_patches']} patches per image at its own aspect ratio (the data "
        "module may change it)" if "naflex" in dc.extra else "x".join(map(str, dc.image_size)),
    )
    describe = getattr(datamodule, "describe", None)
    log.info("data: %s", describe() if callable(describe) else type(datamodule).__name__)
    hp = task.hparams
    log.info("loss: %s; optimizer: %s; schedule: %s", hp.get("loss"), hp.get("optimizer"), hp.get("scheduler"))


def main(argv: list[str] | None = None) -> int:
    """``mmclip train [OVERRIDES...]``: hydra's command line (``--cfg job``, ``-m`` sweeps) included."""
    import sys

    import hydra

    import __main__

    @hydra.main(version_base="1.3", config_path=str(RECIPES_DIR), config_name="train")
    def _run(cfg: DictConfig) -> None:
        train(cfg)

    args = sys.argv[1:] if argv is None else list(argv)
    # Lightning's DDP launcher starts the other ranks by re-running `sys.argv[0]` (or `python -m` the main
    # module) with the same overrides: point both at this file so every rank runs the training entry point.
    sys.argv = [str(Path(__file__).resolve()), *args]
    if getattr(__main__, "__spec__", None) is not None and __main__.__spec__.name != __name__:
        __main__.__spec__ = None
    _run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
