"""The report folder written after a training run: metrics, curves, a similarity heatmap, retrieval examples."""

from __future__ import annotations

import csv
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["write_report"]

log = logging.getLogger(__name__)



def _matplotlib() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_csv_metrics(loggers: list[Any]) -> dict[str, list[tuple[int, float]]]:
    from lightning.pytorch.loggers import CSVLogger

    series: dict[str, list[tuple[int, float]]] = {}
    for lg in loggers or []:
        if not isinstance(lg, CSVLogger):
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open() as f:
            for row in csv.DictReader(f):
                step = int(row.get("step") or 0)
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None):
                        continue
                    series.setdefault(key, []).append((step, float(value)))
    return series


def _plot_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    keys = [k for k in ("train/loss", "train/logit_scale", "train/lr") if k in series]
    if not keys:
        return False
    plt = _matplotlib()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _first_images(datamodule: Any, n: int) -> tuple[Any, list[str]]:
    """The first ``n`` validation images (a tensor, or ``NaFlexImages`` for a NaFlex tower) and the first
    caption of each."""
    images, captions = [], []
    for batch in datamodule.retrieval_dataloader("val", 0, 1):
        index = batch.text_to_image.tolist()
        for row in range(len(batch)):
            if len(images) == n:
                break
            images.append(batch.images[row : row + 1])
            captions.append(batch.captions[index.index(row)] if batch.captions else batch.keys[row])
        if len(images) == n:
            break
    if isinstance(images[0], torch.Tensor):
        return torch.cat(images), captions
    return type(images[0]).cat(images), captions  # NaFlexImages, padded to the longest


def _show(images: Any, index: int, mean: torch.Tensor, std: torch.Tensor) -> Any:
    image = images[index] if isinstance(images, torch.Tensor) else images.image(index)  # (3, H, W)
    return (image * std[:, None, None] + mean[:, None, None]).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def _heatmap_and_grid(model: Any, datamodule: Any, out: Path, n_heat: int = 12, n_pool: int = 200) -> None:
    plt = _matplotlib()
    tokenizer = datamodule.tokenizer
    images, captions = _first_images(datamodule, n_pool)
    device = next(model.parameters()).device
    x = F.normalize(model.encode_image(images.to(device)), dim=-1).float().cpu()  # (P, E)
    t = F.normalize(model.encode_text(tokenizer(captions).to(device)), dim=-1).float().cpu()  # (P, E)
    mean = torch.tensor(model.data_config.mean)
    std = torch.tensor(model.data_config.std)

    # image x caption cosine similarity for the first few pairs: a bright diagonal when training worked
    k = min(n_heat, len(captions))
    sims = (x[:k] @ t[:k].T).numpy()
    fig, ax = plt.subplots(figsize=(10, 8))
    im = ax.imshow(sims, cmap="viridis")
    ax.set_yticks(range(k), [f"image {i}" for i in range(k)], fontsize=7)
    ax.set_xticks(range(k), [c[:40] for c in captions[:k]], rotation=60, ha="right", fontsize=7)
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title("image x caption similarity (validation)")
    fig.tight_layout()
    fig.savefig(out / "similarity_heatmap.png", dpi=110)
    plt.close(fig)

    # text -> image retrieval: each row a caption query and its top 5 images out of the pool
    queries = list(range(0, min(len(captions), 6 * 7), 7))[:6]
    top = (t[queries] @ x.T).topk(5, dim=1).indices  # (Q, 5)
    fig, axes = plt.subplots(len(queries), 6, figsize=(11, 1.9 * len(queries)), squeeze=False)
    for r, q in enumerate(queries):
        axes[r][0].text(0, 0.5, textwrap.fill(captions[q], 28), fontsize=8, va="center")
        axes[r][0].axis("off")
        for c, j in enumerate(top[r].tolist(), start=1):
            ax = axes[r][c]
            ax.imshow(_show(images, j, mean, std))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "green" if j == q else "red"
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(3 if j == q else 1)
    fig.suptitle(
        f"text -> image retrieval among {len(captions)} validation images (green: the captioned image)"
    )
    fig.tight_layout()
    fig.savefig(out / "retrieval_grid.png", dpi=110)
    plt.close(fig)


def write_report(
    task: Any,
    datamodule: Any,
    out_dir: str | Path,
    loggers: list[Any] | None = None,
    cfg: Any = None,
    thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Evaluates ``task.eval_model`` (the EMA weights when the task keeps them) on the data module and writes
    the report folder.

    Writes ``metrics.json``, ``curves.png`` (loss, logit scale, learning rate), ``similarity_heatmap.png``,
    ``retrieval_grid.png`` and ``summary.md``.

    Returns:
        ``{"metrics", "passed", "checks" ({metric: (value, target, ok)}), "dir"}``.
    """
    from mmclip.evaluation.core import evaluate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(task, "eval_model", task.model)
    was_training = model.training
    model.eval()
    try:
        # rank zero alone after a multi-process fit: no collectives
        metrics = evaluate(
            model, datamodule.tokenizer, datamodule, tasks=("zeroshot", "retrieval"), distributed=False
        )
        _heatmap_and_grid(model, datamodule, out)
    finally:
        model.train(was_training)
    thresholds = dict(thresholds or {})
    checks = {k: (metrics.get(k), v, metrics.get(k, float("-inf")) >= v) for k, v in thresholds.items()}
    passed = all(ok for _, _, ok in checks.values())
    stats = getattr(datamodule, "skip_stats", None)  # the training data's skips, by reason
    skipped = stats.as_dict() if stats is not None else {}
    (out / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "thresholds": thresholds, "passed": passed, "data": skipped}, indent=2)
    )
    curves = _plot_curves(_read_csv_metrics(loggers or []), out / "curves.png")
    lines = [
        f"# mmclip run report: {getattr(cfg, 'name', 'run') if cfg is not None else 'run'}",
        "",
        "| metric | value | target | |",
        "|---|---|---|---|",
    ]
    for key, value in sorted(metrics.items()):
        target = thresholds.get(key)
        mark = "" if target is None else ("pass" if value >= target else "FAIL")
        lines.append(f"| {key} | {value:.4f} | {'' if target is None else f'>= {target}'} | {mark} |")
    lines += ["", f"Result: **{'passed' if passed else 'FAILED'}**", ""]
    if stats is not None:
        lines += [
            f"Training samples skipped: {stats.total_skipped} of {stats.total_skipped + stats.n_ok} "
            f"({stats.fraction:.2%}); by reason: {stats.summary()}.",
            "",
        ]
    if curves:
        lines.append("![training curves](curves.png)")
    lines += ["![similarity heatmap](similarity_heatmap.png)", "![retrieval](retrieval_grid.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    log.info("report written to %s (%s)", out, "passed" if passed else "FAILED")
    return {"metrics": metrics, "passed": passed, "checks": checks, "dir": str(out)}
