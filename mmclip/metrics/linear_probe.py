"""Linear probe: multinomial logistic regression on frozen features, L2 strength chosen on a validation split.

The objective for features ``x_i`` (N, D), labels ``y_i`` and strength ``l2`` is

    J(W, b) = mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||_F^2        (the bias is not penalised)

minimised with full-batch L-BFGS (strong Wolfe line search) in float64, from the analytic gradient
(no autograd graph); small CPU problems run single-threaded. scikit-learn's
``LogisticRegression(C=...)`` minimises ``C * sum_i CE + ||W||^2 / 2``: the same problem with
``l2 = 1 / (C * N)``.

Sweep: each ``l2`` of the grid is fitted on the training split (strongest first, each warm-started from
the previous solution) and scored on the validation split; the best validation accuracy wins (ties: the
larger ``l2``). The probe is then refitted on train + validation with that ``l2`` and scored on the test
split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_L2_GRID",
    "LinearClassifier",
    "LinearProbeResult",
    "fit_logistic_regression",
    "fit_linear_probe",
    "split_validation",
]

DEFAULT_L2_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-6, 3))  # 1e-6 ... 1e2
_SMALL_PROBLEM = 1 << 22  # N * D * C below which a fit runs single-threaded on CPU


@dataclass
class LinearClassifier:
    """A fitted linear classifier: ``logits = x @ weight.T + bias``.

    Attributes:
        weight: ``(C, D)``.
        bias: ``(C,)``.
        l2: the strength it was fitted with.
        iterations: L-BFGS function evaluations used.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    iterations: int = 0

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` -> ``(N, C)``."""
        return features.to(self.weight) @ self.weight.T + self.bias

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of ``labels`` predicted (argmax; ties go to the lowest class index)."""
        pred = self.logits(features).argmax(1)
        return float((pred == labels.to(pred.device)).double().mean())


@dataclass
class LinearProbeResult:
    """Outcome of :func:`fit_linear_probe`.

    Attributes:
        accuracy: test accuracy of the probe refitted on train + validation with ``best_l2``.
        best_l2: the chosen strength.
        val_accuracy: ``{l2: validation accuracy}`` for every strength of the sweep.
        classifier: the final probe.
    """

    accuracy: float
    best_l2: float
    val_accuracy: dict[float, float] = field(default_factory=dict)
    classifier: LinearClassifier | None = None


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 500,
    tolerance: float = 1e-9,
    init: LinearClassifier | None = None,
    dtype: torch.dtype = torch.float64,
) -> LinearClassifier:
    """Minimises ``mean CE + l2 / 2 * ||W||^2`` with full-batch L-BFGS.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` in ``[0, num_classes)``.
        num_classes: C.
        l2: L2 strength on the weights (>= 0).
        max_iter: cap on L-BFGS iterations.
        tolerance: stop when the largest gradient entry falls below it.
        init: warm start (e.g. the solution for a nearby ``l2``).
        dtype: computation dtype (float64 keeps the optimum accurate).

    Returns:
        The fitted :class:`LinearClassifier` (on ``features``' device, in ``dtype``). Classes without
        training samples (their optimal bias is -inf) get zero weights and bias ``-inf``: never predicted.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    x = features.detach().to(dtype)
    y = labels.detach().to(x.device).long()
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(
            f"expected features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    present = torch.unique(y)  # classes with training samples; the others have no finite optimum
    if present.numel() < num_classes:
        sub_init = None
        if init is not None:
            sub_init = LinearClassifier(init.weight[present], init.bias[present], init.l2)
        y_sub = torch.searchsorted(present, y)
        sub = fit_logistic_regression(x, y_sub, present.numel(), l2, max_iter, tolerance, sub_init, dtype)
        weight = x.new_zeros(num_classes, x.shape[1])
        bias = x.new_full((num_classes,), -math.inf)  # never predicted
        weight[present], bias[present] = sub.weight, sub.bias
        return LinearClassifier(weight, bias, float(l2), sub.iterations)
    if init is not None:
        weight = init.weight.detach().to(x).clone()
        bias = init.bias.detach().to(x).clone()
        bias[~torch.isfinite(bias)] = 0.0  # a class absent from the warm start's data is present here
    else:
        weight = x.new_zeros(num_classes, x.shape[1])  # (C, D)
        bias = x.new_zeros(num_classes)  # (C,)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    onehot = F.one_hot(y, num_classes).to(x)  # (N, C)
    n = x.shape[0]
    evaluations = 0

    def closure() -> torch.Tensor:
        # loss and its analytic gradient (no autograd graph): d/dlogits of mean CE = (softmax - onehot) / N
        nonlocal evaluations
        evaluations += 1
        logits = x @ weight.T + bias  # (N, C)
        log_p = torch.log_softmax(logits, dim=1)  # (N, C)
        loss = -(log_p * onehot).sum() / n + 0.5 * l2 * weight.pow(2).sum()
        residual = (log_p.exp() - onehot) / n  # (N, C)
        weight.grad = residual.T @ x + l2 * weight  # (C, D)
        bias.grad = residual.sum(0)  # (C,)
        return loss

    with _few_threads_if_small(x, num_classes):
        optimizer.step(closure)
    return LinearClassifier(weight, bias, float(l2), evaluations)


@contextmanager
def _few_threads_if_small(x: torch.Tensor, num_classes: int) -> Iterator[None]:
    """One CPU thread for small problems: L-BFGS makes thousands of tiny ops, and waking a thread pool
    for each costs more than the op (50x slower measured on a busy 2-core machine)."""
    if x.device.type != "cpu" or x.numel() * num_classes > _SMALL_PROBLEM:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def split_validation(
    num_samples: int, fraction: float = 0.2, seed: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train indices, validation indices) carving ``fraction`` of ``num_samples`` for validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if num_samples < 2:
        raise ValueError(f"need at least 2 samples to carve a validation split, got {num_samples}")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    n_val = min(num_samples - 1, max(1, round(fraction * num_samples)))
    return perm[n_val:].sort().values.to(device), perm[:n_val].sort().values.to(device)


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    refit: bool = True,
    seed: int = 0,
    max_iter: int = 500,
) -> LinearProbeResult:
    """Sweeps ``l2_grid`` on a validation split, refits, and reports test accuracy.

    Args:
        train_features: ``(N, D)``; ``train_labels`` ``(N,)``.
        test_features: ``(M, D)``; ``test_labels`` ``(M,)``.
        val_features: ``(V, D)`` and ``val_labels`` ``(V,)``; None: carve ``val_fraction`` of the
            training split (seeded with ``seed``).
        num_classes: C (default: ``max label + 1`` over all splits).
        l2_grid: candidate strengths.
        refit: refit on train + validation with the chosen strength (else keep the train-only fit).
        max_iter: L-BFGS iterations per fit.

    Returns:
        :class:`LinearProbeResult`.
    """
    if not l2_grid:
        raise ValueError("l2_grid must not be empty")
    if (val_features is None) != (val_labels is None):
        raise ValueError("give both val_features and val_labels, or neither")
    if val_features is None or val_labels is None:
        train_idx, val_idx = split_validation(train_features.shape[0], val_fraction, seed)
        val_features, val_labels = train_features[val_idx], train_labels[val_idx]
        train_features, train_labels = train_features[train_idx], train_labels[train_idx]
    if num_classes is None:
        num_classes = 1 + int(max(train_labels.max(), val_labels.max(), test_labels.max()))
    val_accuracy: dict[float, float] = {}
    fits: dict[float, LinearClassifier] = {}
    previous: LinearClassifier | None = None
    for l2 in sorted((float(v) for v in l2_grid), reverse=True):
        previous = fit_logistic_regression(
            train_features, train_labels, num_classes, l2, max_iter=max_iter, init=previous
        )
        fits[l2] = previous
        val_accuracy[l2] = previous.accuracy(val_features, val_labels)
    best_l2 = max(val_accuracy, key=lambda l2: (val_accuracy[l2], l2))
    classifier = fits[best_l2]
    if refit:
        classifier = fit_logistic_regression(
            torch.cat([train_features, val_features.to(train_features)]),
            torch.cat([train_labels, val_labels.to(train_labels)]),
            num_classes,
            best_l2,
            max_iter=max_iter,
            init=classifier,
        )
    return LinearProbeResult(
        accuracy=classifier.accuracy(test_features, test_labels),
        best_l2=best_l2,
        val_accuracy=val_accuracy,
        classifier=classifier,
    )
