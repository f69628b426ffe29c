"""PerceiverResampler: shapes, masks, gradients, and a plain loop-and-einsum reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmclip.layers.perceiver import PerceiverAttention, PerceiverResampler
from tests.conftest import randomize_

DIM = 16


def _resampler(dtype: torch.dtype = torch.float32, **kwargs: object) -> PerceiverResampler:
    torch.manual_seed(0)
    spec = {"dim": DIM, "depth": 2, "num_latents": 5, "heads": 2, "dim_head": 8, **kwargs}
    return randomize_(PerceiverResampler(**spec), seed=1, std=0.3).to(dtype)


def _ref_attention(attn: PerceiverAttention, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor):
    """One layer's attention for (B, S, D) media, (B, n, D) latents, (B, S) mask, one sample and head at a time."""
    B, S, D = media.shape
    H, d = attn.heads, attn.dim_head
    norm = lambda t, ln: F.layer_norm(t, (D,), ln.weight, ln.bias, ln.eps)  # noqa: E731
    media_n, latents_n = norm(media, attn.norm_media), norm(latents, attn.norm_latents)
    w_q = attn.to_q.weight  # (H d, D)
    w_k, w_v = attn.to_kv.weight.chunk(2, dim=0)  # (H d, D) each
    out = torch.zeros(B, latents.shape[1], H * d, dtype=media.dtype)
    for b in range(B):
        keys = torch.cat([media_n[b][mask[b]], latents_n[b]])  # (S_b + n, D): real media tokens and latents
        for h in range(H):
            rows = slice(h * d, (h + 1) * d)
            q = torch.einsum("nc,ec->ne", latents_n[b], w_q[rows])
            k = torch.einsum("sc,ec->se", keys, w_k[rows])
            v = torch.einsum("sc,ec->se", keys, w_v[rows])
            weights = (torch.einsum("ne,se->ns", q, k) / math.sqrt(d)).softmax(dim=-1)
            out[b, :, rows] = torch.einsum("ns,se->ne", weights, v)
    return torch.einsum("bne,ce->bnc", out, attn.to_out.weight)  # (B, n, D)


def _ref_resampler(model: PerceiverResampler, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The full resampler on (B, T, F, N, D) input and (B, T, F, N) mask, one media at a time."""
    B, T, Fr, N, D = x.shape
    out = torch.zeros(B, T, model.num_latents, D, dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            media = x[b, t].clone()  # (F, N, D)
            if model.frame_embed is not None:
                media = media + model.frame_embed[:Fr, None]
            if model.media_time_embed is not None:
                media = media + model.media_time_embed[t]
            media, keep = media.reshape(1, Fr * N, D), mask[b, t].reshape(1, Fr * N)
            latents = model.latents[None]  # (1, n, D)
            for block in model.blocks:
                latents = latents + _ref_attention(block.attn, media, latents, keep)
                ln, fc1, fc2 = block.ff.norm, block.ff.fc1, block.ff.fc2
                hidden = F.gelu(F.layer_norm(latents, (D,), ln.weight, ln.bias, ln.eps) @ fc1.weight.T)
                latents = latents + hidden @ fc2.weight.T
            out[b, t] = F.layer_norm(latents[0], (D,), model.norm.weight, model.norm.bias, model.norm.eps)
    return out


def _random_mask(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.3
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((2, 7, DIM), {}),
        ((2, 3, 7, DIM), {"max_num_media": 4}),
        ((2, 3, 2, 7, DIM), {"max_num_media": 3, "max_num_frames": 2}),
    ],
)
def test_output_shapes(shape: tuple[int, ...], kwargs: dict) -> None:
    model = _resampler(**kwargs)
    x = torch.randn(shape)
    T = shape[1] if len(shape) > 3 else 1
    assert model(x).shape == (2, T, 5, DIM)
    assert model(x, mask=_random_mask(shape[:-1])).shape == (2, T, 5, DIM)


def test_shape_errors() -> None:
    model = _resampler(max_num_media=2, max_num_frames=2)
    with pytest.raises(ValueError, match="max_num_media=2"):
        model(torch.randn(1, 3, 4, DIM))
    with pytest.raises(ValueError, match="max_num_frames=2"):
        model(torch.randn(1, 1, 3, 4, DIM))
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 4, DIM + 1))
    with pytest.raises(ValueError, match="mask must be"):
        model(torch.randn(1, 4, DIM), mask=torch.ones(1, 5, dtype=torch.bool))


def test_padding_tokens_do_not_change_the_output() -> None:
    model = _resampler(torch.float64)  # float64, so that any leak shows far above rounding
    lengths = [3, 7, 5]
    x = torch.randn(3, 7, DIM, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]  # (3, 7)
    padded = model(x, mask=mask)  # (3, 1, n, D)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(padded[b], model(x[b : b + 1, :n])[0], rtol=0, atol=1e-10)

    # several media per sample, each with its own length
    x4 = torch.randn(2, 3, 6, DIM, dtype=torch.float64)
    mask4 = _random_mask((2, 3, 6), seed=1)
    out4 = model(x4, mask=mask4)
    for b in range(2):
        for t in range(3):
            alone = model(x4[b, t][mask4[b, t]][None])  # (1, 1, n, D)
            torch.testing.assert_close(out4[b, t], alone[0, 0], rtol=0, atol=1e-10)

    # frames and time embeddings: whatever sits in the padding, the output is the same
    model = _resampler(torch.float64, max_num_media=2, max_num_frames=3)
    x5 = torch.randn(2, 2, 3, 4, DIM, dtype=torch.float64)
    mask5 = _random_mask((2, 2, 3, 4), seed=2)
    garbage = torch.where(mask5[..., None], x5, 1e3 * torch.randn_like(x5))
    torch.testing.assert_close(model(garbage, mask=mask5), model(x5, mask=mask5), rtol=0, atol=1e-10)

    empty = torch.zeros(1, 4, dtype=torch.bool)  # nothing real: the latents attend to themselves only
    assert torch.isfinite(model(torch.randn(1, 4, DIM, dtype=torch.float64), mask=empty)).all()


def test_one_layer_attention_matches_plain_loop_reference() -> None:
    model = _resampler(torch.float64)
    attn = model.blocks[0].attn
    media = torch.randn(3, 6, DIM, dtype=torch.float64)
    latents = torch.randn(3, 5, DIM, dtype=torch.float64)
    mask = _random_mask((3, 6))
    torch.testing.assert_close(attn(media, latents, mask), _ref_attention(attn, media, latents, mask))
    full = torch.ones(3, 6, dtype=torch.bool)
    torch.testing.assert_close(attn(media, latents), _ref_attention(attn, media, latents, full))


def test_resampler_matches_plain_reference_with_frames_and_time() -> None:
    model = _resampler(torch.float64, max_num_media=3, max_num_frames=2)
    x = torch.randn(2, 3, 2, 4, DIM, dtype=torch.float64)
    mask = _random_mask((2, 3, 2, 4), seed=3)
    torch.testing.assert_close(model(x, mask=mask), _ref_resampler(model, x, mask))


def test_time_embeddings_tell_media_apart() -> None:
    image = torch.randn(1, 1, 4, DIM).expand(1, 2, 4, DIM)  # the same image twice
    out = _resampler(max_num_media=2)(image)
    assert not torch.allclose(out[0, 0], out[0, 1])
    out = _resampler()(image)
    torch.testing.assert_close(out[0, 0], out[0, 1])


def test_gradcheck_float64() -> None:
    spec = {"dim": 4, "num_latents": 3, "dim_head": 3, "ff_mult": 2, "max_num_media": 2, "max_num_frames": 2}
    model = _resampler(torch.float64, **spec)
    x = torch.randn(1, 2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = _random_mask((1, 2, 2, 3), seed=4)
    names = ["latents", "blocks.1.attn.to_kv.weight", "media_time_embed"]
    params = {n: model.get_parameter(n).detach().clone().requires_grad_(True) for n in names}

    def f(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x,), {"mask": mask})

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-5)
