"""The precomputed image tower: embeddings pass through, nothing to train, only the text side learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmclip
from mmclip.models.dual_encoder import DualEncoder
from mmclip.registry import IMAGE_TOWERS
from mmclip.tasks.optim import build_optimizer
from mmclip.towers.image.precomputed import PrecomputedTower

D = 16
TEXT = {"name": "clip_text", "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1, "context_length": 12}


def _model() -> DualEncoder:
    return DualEncoder(
        image_tower={"name": "precomputed", "dim": D}, text_tower=TEXT, embed_dim=D, image_proj="none"
    )


def test_registered_and_passes_embeddings_through() -> None:
    tower = IMAGE_TOWERS.build({"name": "precomputed", "dim": D})
    assert isinstance(tower, PrecomputedTower) and isinstance(tower, mmclip.towers.Tower)
    x = torch.randn(5, D)
    out = tower(x)
    assert out.pooled is x and out.tokens is None and tower.output_dim == D
    assert list(tower.parameters()) == [] and tower.data_config.extra["precomputed_dim"] == D
    tower.lock()  # no-ops
    tower.lock(freeze_norm=True)
    tower.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="unlocked_groups"):
        tower.lock(unlocked_groups=1)


def test_rejects_images_and_bad_dims() -> None:
    tower = PrecomputedTower(D)
    with pytest.raises(ValueError, match="CachedEmbeddingDataModule"):
        tower(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        tower(torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="dim"):
        PrecomputedTower(0)


def test_dual_encoder_image_side_is_the_normalised_input_and_only_text_trains() -> None:
    model = _model()
    x = torch.randn(4, D)
    torch.testing.assert_close(model.encode_image(x, normalize=True), F.normalize(x, dim=-1), rtol=0, atol=0)
    ids = torch.randint(1, 999, (4, 12))
    ids[:, -1] = 999
    out = model(x, ids)
    torch.testing.assert_close(out.image_embeds, F.normalize(x, dim=-1), rtol=0, atol=0)
    out.text_embeds.sum().backward()
    opt = build_optimizer(model, lr=1e-3)
    names = {
        n for n, p in model.named_parameters() if any(p is q for g in opt.param_groups for q in g["params"])
    }
    assert names == {n for n, _ in model.named_parameters()}  # every parameter is a text one or the scale
    assert all(not n.startswith(("image_tower.", "image_proj.")) for n in names)
    assert any(n.startswith("text_tower.") for n in names)
    # the DualEncoder also runs LiT's lock on it without complaint
    model.lock_image_tower()
