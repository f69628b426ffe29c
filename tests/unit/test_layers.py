"""Layers: fp32 LayerNorm under low precision, masked poolers, attention against a plain formula."""

from __future__ import annotations

import pytest
import torch

from mmclip.layers import Attention, LastPool, LayerNorm, MeanPool


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layernorm_statistics_in_fp32(dtype: torch.dtype) -> None:
    ln = LayerNorm(64)
    x = (torch.randn(4, 64) * 50 + 1000).to(dtype)
    out = ln.to(dtype)(x)
    assert out.dtype == dtype
    ref = torch.nn.functional.layer_norm(x.float(), (64,), eps=ln.eps)
    torch.testing.assert_close(out.float(), ref.to(dtype).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LayerNorm(64)(torch.randn(2, 64)).dtype == torch.float32


def test_mean_and_last_pool_with_mask() -> None:
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(MeanPool()(x, mask), torch.stack([x[0, :2].mean(0), x[1].mean(0)]))
    torch.testing.assert_close(LastPool()(x, mask), torch.stack([x[0, 1], x[1, 3]]))
    torch.testing.assert_close(LastPool()(x), x[:, -1])


def test_attention_matches_softmax_formula() -> None:
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    split = lambda t: t.view(2, 5, 4, 4).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~causal, float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, causal=True), ref, atol=1e-6, rtol=1e-5)
