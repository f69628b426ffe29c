"""ClipLoss and SigLipLoss in one process: closed forms, the plain references, options and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmclip
from mmclip.losses import ClipLoss, SigLipLoss, clamp_logit_scale_, siglip_block
from mmclip.outputs import DualEncoderOutput

from .reference import clip_reference, siglip_reference


def _features(n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(
        torch.randn(n, d, generator=g), dim=-1
    )


def test_clip_closed_form_orthonormal() -> None:
    s = 3.0
    eye = torch.eye(2)
    out = ClipLoss()(DualEncoderOutput(eye, eye, torch.tensor(s)))
    assert math.isclose(out["loss"].item(), math.log1p(math.exp(-s)), rel_tol=1e-6)


def test_clip_closed_form_identical_features_is_log_batch() -> None:
    x = F.normalize(torch.ones(8, 4), dim=-1)
    out = ClipLoss()(DualEncoderOutput(x, x, torch.tensor(10.0)))
    assert math.isclose(out["loss"].item(), math.log(8), rel_tol=1e-6)


def test_siglip_closed_form_orthonormal() -> None:
    s, b = 5.0, -2.0
    eye = torch.eye(2)
    out = SigLipLoss()(DualEncoderOutput(eye, eye, torch.tensor(s), torch.tensor(b)))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = (2 * sp(-(s + b)) + 2 * sp(b)) / 2  # two positives at s + b, two negatives at b
    assert math.isclose(out["loss"].item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_clip_matches_reference_value_and_grads(label_smoothing: float) -> None:
    x, y = _features(12)
    x, y = x.requires_grad_(), y.requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    loss = ClipLoss(label_smoothing=label_smoothing).compute(x, y, scale)["loss"]
    grads = torch.autograd.grad(loss, [x, y, scale])
    x64, y64, s64 = (t.detach().double().requires_grad_() for t in (x, y, scale))
    ref = clip_reference(x64, y64, s64, label_smoothing=label_smoothing)
    ref_grads = torch.autograd.grad(ref, [x64, y64, s64])
    assert abs(loss.item() - ref.item()) < 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 12, 100])
def test_siglip_matches_reference_value_and_grads(chunk_size: int | None) -> None:
    x, y = _features(12, seed=1)
    x, y = x.requires_grad_(), y.requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = SigLipLoss(chunk_size=chunk_size).compute(x, y, scale, bias)["loss"]
    grads = torch.autograd.grad(loss, [x, y, scale, bias])
    x64, y64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, y, scale, bias))
    ref = siglip_reference(x64, y64, s64, b64)
    ref_grads = torch.autograd.grad(ref, [x64, y64, s64, b64])
    assert abs(loss.item() - ref.item()) < 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, atol=1e-6, rtol=0)


def test_siglip_block_without_grad_and_negatives_only() -> None:
    x, y = _features(6, seed=2)
    with torch.no_grad():
        total = siglip_block(x, y, torch.tensor(3.0), torch.tensor(-1.0), pos_offset=None, chunk_size=4)
    expected = F.softplus(3.0 * x @ y.T - 1.0).sum()  # every pair a negative: -log sigmoid(-l) = softplus(l)
    torch.testing.assert_close(total, expected)


def test_loss_with_model_output_by_name() -> None:
    model = mmclip.create_model("tiny-siglip")
    out = model(torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4, 64)))
    terms = mmclip.LOSSES.build("siglip")(out)
    assert {"loss", "logit_scale", "logit_bias", "pos_logit_mean"} <= set(terms)
    terms["loss"].backward()
    assert model.logit_bias.grad is not None and model.logit_scale.grad is not None
    clip_terms = mmclip.LOSSES.build({"name": "clip", "label_smoothing": 0.1})(out)
    assert {"loss", "loss_i2t", "loss_t2i", "neg_logit_mean"} <= set(clip_terms)


def test_clip_logging_terms_match_block() -> None:
    x, y = _features(5, seed=3)
    out = ClipLoss().compute(x, y, torch.tensor(2.0))
    logits = 2.0 * x @ y.T
    off = ~torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(out["pos_logit_mean"], logits.diagonal().mean())
    torch.testing.assert_close(out["neg_logit_mean"], logits[off].mean())


def test_temperature_policy() -> None:
    param = torch.nn.Parameter(torch.tensor(math.log(500.0)))
    SigLipLoss().clamp_(param)
    assert math.isclose(param.exp().item(), 500.0, rel_tol=1e-5)  # SigLIP: no clamp by default
    ClipLoss().clamp_(param)
    assert math.isclose(param.exp().item(), 100.0, rel_tol=1e-5)
    param.data.fill_(-1.0)
    clamp_logit_scale_(param)
    assert param.item() == 0.0


def test_siglip_batch_bias_init() -> None:
    b = SigLipLoss.init_bias_for_batch(1024)
    assert math.isclose(torch.sigmoid(torch.tensor(b)).item(), 1 / 1024, rel_tol=1e-5)


def test_errors() -> None:
    x, y = _features(4)
    with pytest.raises(ValueError, match="pair up one to one.*image \\(4, 16\\).*text \\(3, 16\\)"):
        ClipLoss().compute(x, y[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="needs a logit_bias"):
        SigLipLoss().compute(x, y, torch.tensor(1.0))
    with pytest.raises(ValueError, match="does not support exchange 'ring'.*'gather', 'local'"):
        ClipLoss(exchange="ring")
    bad = x.clone()
    bad[0, 0] = float("nan")
    ClipLoss().compute(bad, y, torch.tensor(1.0))  # fast path: no check, no sync
    with pytest.raises(FloatingPointError, match="image_embeds has non-finite"):
        ClipLoss(check_inputs=True).compute(bad, y, torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="logit_scale has non-finite"):
        SigLipLoss(check_inputs=True).compute(x, y, torch.tensor(float("inf")), torch.tensor(0.0))


@pytest.mark.parametrize("loss_fn", [ClipLoss(), SigLipLoss(), SigLipLoss(chunk_size=4)])
def test_fp32_inside_autocast(loss_fn) -> None:
    """Under bf16 autocast the loss still runs in fp32 (same value and gradients as outside it)."""
    x, y = _features(12, seed=4)
    scale, bias = torch.tensor(60.0), torch.tensor(-5.0)

    def run(autocast: bool) -> tuple[torch.Tensor, ...]:
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # forward only, as in training
            loss = loss_fn.compute(xs, ys, scale, bias if isinstance(loss_fn, SigLipLoss) else None)["loss"]
        loss.backward()
        return loss.detach(), xs.grad, ys.grad

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


def test_no_gradient_work_without_grad_mode() -> None:
    x, y = _features(6, seed=5)
    x.requires_grad_()
    with torch.no_grad():
        out = SigLipLoss().compute(x, y, torch.tensor(3.0), torch.tensor(-1.0))
    assert out["loss"].grad_fn is None
