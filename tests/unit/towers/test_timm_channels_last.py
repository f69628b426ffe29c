"""A timm tower fed channels-last images computes what the plain one computes (forward and gradients)."""

from __future__ import annotations

import torch

import mmclip


def test_channels_last_timm_tower_matches_the_plain_one():
    spec = {"name": "timm", "model_name": "test_resnet", "image_size": 64}
    torch.manual_seed(0)
    plain = mmclip.IMAGE_TOWERS.build(spec)
    fast = mmclip.IMAGE_TOWERS.build({**spec, "channels_last": True})
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 64, 64)
    a, b = plain(x).pooled, fast(x).pooled
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
