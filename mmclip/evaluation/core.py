"""Evaluate a dual encoder on a data module: zero-shot classification, retrieval, linear probe.

:func:`evaluate` is the plain entry point (no Trainer; used by ``mmclip eval`` and the demo). The
``run_*`` functions do one task each on one process's shard of the data; inside a
``torch.distributed`` process group every process calls them with its own shard and gets the same
result as one process on all the data (the eval callbacks in ``mmclip.evaluation.callbacks`` use them
that way).

Samples are identified across processes by a 63-bit hash of their ``ImageTextBatch.keys``
(:func:`key_ids`), so duplicated samples (sampler padding) count once.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mmclip.data.batch import ImageTextBatch
from mmclip.metrics.linear_probe import DEFAULT_L2_GRID, fit_linear_probe
from mmclip.metrics.retrieval import DEFAULT_CHUNK_SIZE, DEFAULT_KS, RetrievalMetric, unique_first_index
from mmclip.metrics.zeroshot import (
    Template,
    ZeroShotAccuracy,
    build_zeroshot_classifier,
    subset_scores,
    zeroshot_logits,
)

__all__ = [
    "TASKS",
    "default_class_subsets",
    "embed_classification",
    "eval_mode",
    "evaluate",
    "key_ids",
    "results_table",
    "run_linear_probe",
    "run_retrieval",
    "run_zeroshot",
]

log = logging.getLogger(__name__)

TASKS = ("zeroshot", "retrieval", "linear_probe")
_ID_MASK = (1 << 63) - 1


def key_ids(keys: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """``(B,)`` int64 ids: the first 8 bytes of blake2b of each key, masked to 63 bits (non-negative)."""
    ids = [
        int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(), "little") & _ID_MASK
        for k in keys
    ]
    return torch.tensor(ids, dtype=torch.long, device=device)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` and ``torch.no_grad()`` inside; every submodule's own train/eval flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in flags:
            m.training = training


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def _batches(loader: Iterable[Any]) -> Iterator[ImageTextBatch]:
    for batch in loader:
        if not isinstance(batch, ImageTextBatch):
            raise TypeError(f"evaluation loaders must yield ImageTextBatch, got {type(batch).__name__}")
        yield batch


def _encode_images(model: nn.Module, batch: ImageTextBatch, device: torch.device) -> torch.Tensor:
    images = batch.images.to(device, dtype=_float_dtype(model), non_blocking=True)
    return model.encode_image(images, normalize=True).float()  # (B, E)


def _world(distributed: bool | None = None) -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one or when ``distributed`` is False."""
    if distributed is not False and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if distributed:
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return 0, 1


def run_retrieval(
    model: nn.Module,
    loader: Iterable[ImageTextBatch],
    device: torch.device | str | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    paired: bool = True,
    amp_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
) -> dict[str, float]:
    """Image<->text recall@k of ``model`` on the captions of ``loader`` (this process's shard).

    Args:
        model: a ``DualEncoder`` (``encode_image`` / ``encode_text``); called in eval mode, no grad.
        loader: batches with all captions of each image (``caption_image_index`` set).
        device: where to run (default: the model's device).
        ks: the k of recall@k.
        chunk_size: image rows of the similarity matrix held at a time.
        paired: also report OpenCLIP's paired 1:1 metrics.
        amp_dtype: autocast dtype for the towers (e.g. ``torch.bfloat16``), or None.
        distributed: None: shard over the default process group when there is one (every process must
            call); False: this process alone, even inside a process group; True: require a group.

    Returns:
        See :class:`mmclip.metrics.RetrievalMetric` (keys ``i2t_R@1``, ``t2i_R@5``, ``paired_i2t_R@1``, ...).
    """
    dev = _device_of(model, device)
    sync = _world(distributed)[1] > 1
    metric = RetrievalMetric(ks=ks, chunk_size=chunk_size, paired=paired, sync_on_compute=sync).to(dev)
    with eval_mode(model), _autocast(dev, amp_dtype):
        for batch in _batches(loader):
            image_embeds = _encode_images(model, batch, dev)  # (B, E)
            text_embeds = model.encode_text(batch.input_ids.to(dev), normalize=True).float()  # (T, E)
            ids = key_ids(batch.keys, dev)  # (B,)
            metric.update(image_embeds, ids, text_embeds, ids[batch.text_to_image.to(dev)])
    return {k: float(v) for k, v in metric.compute().items()}


def run_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    loader: Iterable[ImageTextBatch],
    classnames: Sequence[str],
    templates: Sequence[Template] | Mapping[str, Sequence[Template]] | None = None,
    device: torch.device | str | None = None,
    topk: Sequence[int] = (1, 5),
    class_subsets: Mapping[str, Sequence[int | str]] | None = None,
    per_class: bool = False,
    prompt_batch_size: int = 256,
    amp_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy of ``model`` on the labelled images of ``loader`` (this process's shard).

    Args:
        model: a ``DualEncoder``.
        tokenizer: ``tokenizer(list[str]) -> (B, L)`` ids.
        loader: batches with ``labels`` (indices into ``classnames``; -1 = unknown, skipped).
        classnames: class names in label order.
        templates: prompt templates (placeholder ``{}``), per-class dict, or None for the default set.
        device: where to run (default: the model's device).
        topk: the k of top-k accuracy.
        class_subsets: ``{name: classes}`` (indices or class names) also scored on their own, as
            ``{name}_top1`` and ``{name}_mean_per_class_recall`` (e.g. held-out classes).
        per_class: also return ``recall_{classname}`` for every class with samples.
        prompt_batch_size: prompts per text forward pass.
        amp_dtype: autocast dtype for the towers, or None.
        distributed: see :func:`run_retrieval`.

    Returns:
        ``{"top1", "top5", "mean_per_class_recall", ...}``.
    """
    dev = _device_of(model, device)
    sync = _world(distributed)[1] > 1
    metric = ZeroShotAccuracy(num_classes=len(classnames), topk=topk, sync_on_compute=sync).to(dev)
    with eval_mode(model), _autocast(dev, amp_dtype):
        classifier = build_zeroshot_classifier(
            model, tokenizer, classnames, templates, batch_size=prompt_batch_size, device=dev
        )  # (E, C)
        for batch in _batches(loader):
            if batch.labels is None:
                raise ValueError("zero-shot classification needs batches with labels")
            logits = zeroshot_logits(_encode_images(model, batch, dev), classifier)  # (B, C)
            metric.update(logits, batch.labels.to(dev), key_ids(batch.keys, dev))
    res = metric.compute()
    out = {k: float(v) for k, v in res.items() if v.ndim == 0}
    index = {name: i for i, name in enumerate(classnames)}
    for name, classes in (class_subsets or {}).items():
        idx = [index[c] if isinstance(c, str) else int(c) for c in classes]
        for key, value in subset_scores(res["per_class_recall"], res["per_class_count"], idx).items():
            out[f"{name}_{key}"] = value
    if per_class:
        for i, name in enumerate(classnames):
            if int(res["per_class_count"][i]) > 0:
                out[f"recall_{name}"] = float(res["per_class_recall"][i])
    return out


def embed_classification(
    model: nn.Module,
    loader: Iterable[ImageTextBatch],
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image embeddings and labels of a labelled split, gathered from every process.

    Samples with label -1 are dropped; samples seen twice (same key) count once; rows are ordered by key
    id, so the result does not depend on the sharding.

    Returns:
        ``(N, E)`` float32 features and ``(N,)`` int64 labels, on ``device``.
    """
    dev = _device_of(model, device)
    feats, labels, ids = [], [], []
    with eval_mode(model), _autocast(dev, amp_dtype):
        for batch in _batches(loader):
            if batch.labels is None:
                raise ValueError("a linear probe needs batches with labels")
            feats.append(_encode_images(model, batch, dev))
            labels.append(batch.labels.to(dev).long())
            ids.append(key_ids(batch.keys, dev))
    dim = feats[0].shape[1] if feats else int(getattr(model, "embed_dim", 0))
    x = torch.cat(feats) if feats else torch.zeros(0, dim, device=dev)  # (n, E)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=dev)  # (n,)
    i = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=dev)  # (n,)
    if _world(distributed)[1] > 1:
        from torchmetrics.utilities.distributed import gather_all_tensors

        x, y, i = (torch.cat(gather_all_tensors(t)) for t in (x, y, i))
    known = y >= 0
    x, y, i = x[known], y[known], i[known]
    if i.numel() == 0:
        raise ValueError("the labelled split is empty")
    keep = unique_first_index(i)  # sorted by id
    return x[keep], y[keep]


def run_linear_probe(
    model: nn.Module,
    train_loader: Iterable[ImageTextBatch],
    test_loader: Iterable[ImageTextBatch],
    val_loader: Iterable[ImageTextBatch] | None = None,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 500,
    amp_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
) -> dict[str, float]:
    """Logistic-regression probe on frozen, normalised image embeddings (every process gets the same result).

    Args:
        model: a ``DualEncoder``.
        train_loader: labelled training split (this process's shard).
        test_loader: labelled test split.
        val_loader: labelled validation split for the L2 sweep; None: carve ``val_fraction`` of train.
        num_classes: C (default: max label + 1).
        l2_grid: L2 strengths swept (see :mod:`mmclip.metrics.linear_probe`).
        seed: seed of the carved validation split.
        max_iter: L-BFGS iterations per fit.
        distributed: see :func:`run_retrieval`.

    Returns:
        ``{"accuracy": test accuracy, "l2": chosen strength, "val_accuracy": its validation accuracy}``.
    """
    dev = _device_of(model, device)
    x_train, y_train = embed_classification(model, train_loader, dev, amp_dtype, distributed)
    x_test, y_test = embed_classification(model, test_loader, dev, amp_dtype, distributed)
    x_val = y_val = None
    if val_loader is not None:
        x_val, y_val = embed_classification(model, val_loader, dev, amp_dtype, distributed)
    result = fit_linear_probe(
        x_train,
        y_train,
        x_test,
        y_test,
        x_val,
        y_val,
        num_classes=num_classes,
        l2_grid=l2_grid,
        val_fraction=val_fraction,
        seed=seed,
        max_iter=max_iter,
    )
    return {
        "accuracy": result.accuracy,
        "l2": result.best_l2,
        "val_accuracy": result.val_accuracy[result.best_l2],
    }


def default_class_subsets(datamodule: Any) -> dict[str, list[int | str]] | None:
    """``{"held_out": datamodule.held_out_classes}`` when the data module names held-out classes, else None."""
    held_out = getattr(datamodule, "held_out_classes", None)
    return {"held_out": list(held_out)} if held_out else None


def _prepare(datamodule: Any, model: nn.Module, tokenizer: Any, stage: str | None) -> None:
    if hasattr(datamodule, "configure"):
        kwargs: dict[str, Any] = {}
        data_config = getattr(model, "data_config", None)
        if data_config is not None:
            kwargs["data_config"] = data_config
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        datamodule.configure(**kwargs)
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    if hasattr(datamodule, "setup"):
        datamodule.setup(stage)


def evaluate(
    model: nn.Module,
    tokenizer: Any = None,
    datamodule: Any = None,
    tasks: Sequence[str] = TASKS,
    device: torch.device | str | None = None,
    retrieval_split: str = "val",
    zeroshot_split: str = "test",
    probe_splits: tuple[str, str | None, str] = ("train", "val", "test"),
    classnames: Sequence[str] | None = None,
    templates: Sequence[Template] | Mapping[str, Sequence[Template]] | None = None,
    class_subsets: Mapping[str, Sequence[int | str]] | None = None,
    per_class: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    amp_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
    prepare_datamodule: bool = True,
    setup_stage: str | None = "validate",
) -> dict[str, float]:
    """Runs the requested evaluation tasks in this process and returns ``{"task/metric": value}``.

    Example::

        model = create_model("tiny-vit")
        dm = SyntheticDataModule(batch_size=64)
        results = evaluate(model, get_tokenizer("clip"), dm, tasks=("zeroshot", "retrieval"))
        Console().print(results_table(results))

    Args:
        model: a ``DualEncoder``; moved to ``device`` when one is given.
        tokenizer: for zero-shot prompts (default: ``datamodule.tokenizer``).
        datamodule: provides ``retrieval_dataloader(split, rank, world_size)``,
            ``classification_dataloader(split, rank, world_size)`` (None without labels),
            ``classnames``, ``templates``, ``tokenizer``.
        tasks: any of ``"zeroshot"``, ``"retrieval"``, ``"linear_probe"``. A classification task on data
            without labels or class names is skipped with a warning.
        device: where to run (default: where the model is).
        retrieval_split: split for retrieval.
        zeroshot_split: split for zero-shot classification.
        probe_splits: (train, validation or None to carve it from train, test) for the linear probe;
            a validation split the data module does not have (None loader) is carved from train too.
        classnames: override ``datamodule.classnames``.
        templates: override ``datamodule.templates`` (None there means mmclip's default set).
        class_subsets: zero-shot scores on class subsets (see :func:`run_zeroshot`); None: the data
            module's :func:`default_class_subsets` (its ``held_out_classes``, if it has them).
        per_class: zero-shot recall of every class.
        ks: recall@k's k.
        chunk_size: image rows of the retrieval similarity matrix held at a time.
        l2_grid: linear-probe L2 strengths.
        amp_dtype: autocast dtype for the towers, or None (fp32).
        distributed: None: when a ``torch.distributed`` process group exists, every process evaluates its
            shard (``rank``, ``world_size`` passed to the loaders) and all must call ``evaluate``; False:
            evaluate all the data in this process alone (e.g. on rank 0 only).
        prepare_datamodule: first call ``datamodule.configure(data_config=model.data_config,
            tokenizer=tokenizer)`` (when it has ``configure``), ``prepare_data()`` and
            ``setup(setup_stage)``.
        setup_stage: the stage passed to ``datamodule.setup``.

    Returns:
        Flat ``{"zeroshot/top1": ..., "retrieval/t2i_R@1": ..., "linear_probe/accuracy": ...}``.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown evaluation tasks {sorted(unknown)}; known: {list(TASKS)}")
    if datamodule is None:
        raise ValueError("evaluate needs a datamodule with retrieval_dataloader / classification_dataloader")
    if device is not None:
        model.to(device)
    if prepare_datamodule:
        _prepare(datamodule, model, tokenizer, setup_stage)
    tokenizer = tokenizer if tokenizer is not None else getattr(datamodule, "tokenizer", None)
    rank, world_size = _world(distributed)
    shard = {"rank": rank, "world_size": world_size}
    results: dict[str, float] = {}
    if "zeroshot" in tasks:
        names = classnames if classnames is not None else getattr(datamodule, "classnames", None)
        loader = datamodule.classification_dataloader(split=zeroshot_split, **shard)
        if loader is None or not names:
            log.warning("skipping zero-shot evaluation: the data has no labels or no class names")
        elif tokenizer is None:
            raise ValueError("zero-shot evaluation needs a tokenizer (argument or datamodule.tokenizer)")
        else:
            prompts = templates if templates is not None else getattr(datamodule, "templates", None)
            res = run_zeroshot(
                model,
                tokenizer,
                loader,
                names,
                prompts,
                device=device,
                class_subsets=default_class_subsets(datamodule) if class_subsets is None else class_subsets,
                per_class=per_class,
                amp_dtype=amp_dtype,
                distributed=distributed,
            )
            results |= {f"zeroshot/{k}": v for k, v in res.items()}
    if "retrieval" in tasks:
        loader = datamodule.retrieval_dataloader(split=retrieval_split, **shard)
        if loader is None:
            log.warning("skipping retrieval: the data has no %r split", retrieval_split)
        else:
            res = run_retrieval(
                model,
                loader,
                device=device,
                ks=ks,
                chunk_size=chunk_size,
                amp_dtype=amp_dtype,
                distributed=distributed,
            )
            results |= {f"retrieval/{k}": v for k, v in res.items()}
    if "linear_probe" in tasks:
        train_split, val_split, test_split = probe_splits
        train = datamodule.classification_dataloader(split=train_split, **shard)
        test = datamodule.classification_dataloader(split=test_split, **shard)
        val = datamodule.classification_dataloader(split=val_split, **shard) if val_split else None
        if train is None or test is None:
            log.warning("skipping the linear probe: the data has no labels")
        else:
            names = classnames if classnames is not None else getattr(datamodule, "classnames", None)
            res = run_linear_probe(
                model,
                train,
                test,
                val,
                device=device,
                num_classes=len(names) if names else None,
                l2_grid=l2_grid,
                amp_dtype=amp_dtype,
                distributed=distributed,
            )
            results |= {f"linear_probe/{k}": v for k, v in res.items()}
    return results


def _format(key: str, value: float) -> str:
    if math.isnan(value):
        return "nan"
    if key.endswith("_rank"):
        return f"{value:.1f}"
    if key.endswith("/l2") or key == "l2":
        return f"{value:.0e}"
    return f"{value:.4f}"


def results_table(results: Mapping[str, float], title: str | None = "mmclip evaluation") -> Any:
    """A ``rich.table.Table`` of a results dict: one row per metric, grouped by task (the key's prefix).

    Print it with ``rich.console.Console().print(table)``.
    """
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task", style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    previous = None
    for key, value in results.items():
        task, _, metric = key.rpartition("/")
        table.add_row(task if task != previous else "", metric, _format(key, float(value)))
        previous = task
    return table
