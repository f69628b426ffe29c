"""Linear probe: separable data, the optimum against scipy's L-BFGS-B and a closed-form limit, the sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmclip.metrics import DEFAULT_L2_GRID, fit_linear_probe, fit_logistic_regression, split_validation


def gaussians(
    n_per_class: int, seed: int, dim: int = 6, classes: int = 3, sep: float = 4.0, std: float = 0.5
):
    g = torch.Generator().manual_seed(seed)
    means = sep * torch.eye(classes, dim)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = means[y] + std * torch.randn(y.numel(), dim, generator=g)
    return x, y


def test_separable_gaussians_reach_full_accuracy() -> None:
    x_tr, y_tr = gaussians(40, 0)
    x_va, y_va = gaussians(15, 1)
    x_te, y_te = gaussians(25, 2)
    res = fit_linear_probe(x_tr, y_tr, x_te, y_te, x_va, y_va)
    assert res.accuracy == 1.0
    assert res.best_l2 in DEFAULT_L2_GRID
    assert set(res.val_accuracy) == set(DEFAULT_L2_GRID)
    best_acc = max(res.val_accuracy.values())
    assert res.val_accuracy[res.best_l2] == best_acc
    assert res.best_l2 == max(l2 for l2, a in res.val_accuracy.items() if a == best_acc)  # ties: stronger


def test_optimum_matches_scipy() -> None:
    minimize = pytest.importorskip("scipy.optimize").minimize
    x, y = gaussians(30, 3, sep=1.0, std=1.0)  # overlapping classes: a well-posed optimum
    C, D, l2 = 3, x.shape[1], 0.03
    X, Y = x.double().numpy(), F.one_hot(y, C).double().numpy()

    def objective(theta):
        W, b = theta[: C * D].reshape(C, D), theta[C * D :]
        z = X @ W.T + b
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss = -(Y * logp).sum() / len(X) + 0.5 * l2 * (W**2).sum()
        r = (np.exp(logp) - Y) / len(X)
        return loss, np.concatenate([(r.T @ X + l2 * W).ravel(), r.sum(0)])

    ref = minimize(
        objective,
        np.zeros(C * D + C),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000},
    )
    ours = fit_logistic_regression(x, y, C, l2)
    np.testing.assert_allclose(ours.weight.numpy(), ref.x[: C * D].reshape(C, D), atol=1e-6)
    np.testing.assert_allclose(ours.bias.numpy(), ref.x[C * D :], atol=1e-6)
    # and the gradient (by autograd) vanishes at our solution
    w, b = ours.weight.clone().requires_grad_(), ours.bias.clone().requires_grad_()
    loss = F.cross_entropy(x.double() @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert max(gw.abs().max(), gb.abs().max()) < 1e-7


def test_strong_l2_limit_is_the_class_prior() -> None:
    """As l2 -> inf, W -> 0 and softmax(b) -> the class frequencies (b is not penalised)."""
    x, y = gaussians(10, 4)
    y = torch.cat([y, torch.zeros(10, dtype=torch.long)])  # class 0 twice as frequent
    x = torch.cat([x, x[:10]])
    fit = fit_logistic_regression(x, y, 3, l2=1e6)
    assert fit.weight.abs().max() < 1e-4
    torch.testing.assert_close(
        fit.bias.softmax(0), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_carved_validation_is_seeded_and_disjoint() -> None:
    tr, va = split_validation(50, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40 and not set(tr.tolist()) & set(va.tolist())
    tr2, va2 = split_validation(50, 0.2, seed=3)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    x, y = gaussians(30, 5)
    x_te, y_te = gaussians(10, 6)
    res = fit_linear_probe(x, y, x_te, y_te, l2_grid=(1e-3, 1.0), seed=1)
    assert res.accuracy == 1.0 and set(res.val_accuracy) == {1e-3, 1.0}
    with pytest.raises(ValueError, match="both val_features and val_labels"):
        fit_linear_probe(x, y, x_te, y_te, val_features=x)


def test_classes_without_training_samples_are_never_predicted() -> None:
    x, y = gaussians(15, 7, sep=1.0, std=1.0)
    y = y * 2  # classes 0, 2, 4 of 5: classes 1 and 3 have no samples (no finite optimum)
    fit = fit_logistic_regression(x, y, 5, l2=0.05)
    assert torch.isinf(fit.bias[[1, 3]]).all() and (fit.weight[[1, 3]] == 0).all()
    sub = fit_logistic_regression(x, y // 2, 3, l2=0.05)
    torch.testing.assert_close(fit.weight[[0, 2, 4]], sub.weight)
    torch.testing.assert_close(fit.bias[[0, 2, 4]], sub.bias)
    assert set(fit.logits(x).argmax(1).tolist()) <= {0, 2, 4}


def test_warm_start_from_a_fit_that_lacked_a_class() -> None:
    x, y = gaussians(15, 8, sep=1.0, std=1.0)
    partial = fit_logistic_regression(x[y != 1], y[y != 1], 3, l2=0.05)  # class 1 absent: bias -inf
    warm = fit_logistic_regression(x, y, 3, l2=0.05, init=partial)
    cold = fit_logistic_regression(x, y, 3, l2=0.05)
    assert torch.isfinite(warm.bias).all()
    torch.testing.assert_close(warm.weight, cold.weight, atol=1e-6, rtol=0)
