"""The tower contract (DESIGN.md), checked on every registered tower with a tiny spec."""

from __future__ import annotations

import copy

import pytest
import torch

import mmclip
from mmclip.models.factory import get_model_config
from mmclip.registry import IMAGE_TOWERS, TEXT_TOWERS
from mmclip.towers.base import DataConfig
from tests.conftest import randomize_


def _tower_spec(model: str, tower: str, **overrides: object) -> dict:
    """A tower spec taken from a named tiny model config."""
    return {**get_model_config(model)[tower], **overrides}


# one tiny spec per registered tower, from the named tiny configs
TINY_IMAGE = {
    spec["name"]: spec
    for spec in (_tower_spec(m, "image_tower") for m in ("tiny-vit", "tiny-resnet", "tiny-efficientnet", "tiny-naflex"))
}
_bert = _tower_spec("tiny-bert", "text_tower")
TINY_TEXT = {
    "clip_text": _tower_spec("tiny-vit", "text_tower", vocab_size=1000),
    # no dropout, so gradients with and without checkpointing can be compared in train mode
    "hf": dict(
        _bert, config={**_bert["config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    ),
}
B = 3
# towers whose input is not an image: their own tests (test_precomputed.py) replace the pixel contract
NON_PIXEL_IMAGE = {"precomputed"}


def _image_input(tower: torch.nn.Module) -> torch.Tensor:
    h, w = tower.data_config.image_size
    return torch.randn(B, 3, h, w, generator=torch.Generator().manual_seed(0))


def _text_input() -> torch.Tensor:
    ids = torch.randint(1, 998, (B, 16), generator=torch.Generator().manual_seed(0))
    ids[0, 6:] = 0
    ids[0, 5] = 999  # largest id = end of text for argmax pooling
    ids[1, 15] = 999
    ids[2, 9] = 999
    ids[2, 10:] = 0
    return ids


def _build(kind: str, name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if kind == "image":
        tower = randomize_(IMAGE_TOWERS.build(TINY_IMAGE[name]), seed=1)
        return tower, _image_input(tower)
    return randomize_(TEXT_TOWERS.build(TINY_TEXT[name]), seed=1), _text_input()


TOWERS = [("image", n) for n in IMAGE_TOWERS.names() if n not in NON_PIXEL_IMAGE] + [
    ("text", n) for n in TEXT_TOWERS.names()
]


def test_every_registered_tower_has_a_tiny_spec() -> None:
    assert set(IMAGE_TOWERS.names()) == set(TINY_IMAGE) | NON_PIXEL_IMAGE, (
        "add a tiny spec for each new image tower"
    )
    assert set(TEXT_TOWERS.names()) == set(TINY_TEXT), "add a tiny spec for each new text tower"


@pytest.mark.parametrize("kind,name", TOWERS)
def test_output_contract(kind: str, name: str) -> None:
    tower, x = _build(kind, name)
    assert isinstance(tower, mmclip.towers.Tower)
    out = tower.eval()(x)
    assert isinstance(out, mmclip.TowerOutput)
    assert out.pooled.shape == (B, tower.output_dim)
    assert out.tokens is not None and out.tokens.ndim == 3 and out.tokens.shape[0] == B
    if out.mask is not None:
        assert out.mask.dtype == torch.bool and out.mask.shape == out.tokens.shape[:2]
    assert torch.isfinite(out.pooled).all()
    if kind == "image":
        assert isinstance(tower.data_config, DataConfig)
        assert tuple(x.shape[-2:]) == tower.data_config.image_size


@pytest.mark.parametrize("kind,name", TOWERS)
def test_lock_freezes_all_then_unlocks_last_groups(kind: str, name: str) -> None:
    tower, x = _build(kind, name)
    tower.lock()
    assert not any(p.requires_grad for p in tower.parameters())

    tower, x = _build(kind, name)
    groups = tower.layer_groups()
    last = {
        id(p)
        for item in groups[-1]
        for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())
    }
    tower.lock(unlocked_groups=1)
    trainable = {id(p) for p in tower.parameters() if p.requires_grad}
    assert trainable and trainable <= last
    tower.train()(x).pooled.sum().backward()
    for p in tower.parameters():
        if not p.requires_grad:
            assert p.grad is None

    with pytest.raises(ValueError, match="unlocked_groups"):
        tower.lock(unlocked_groups=len(groups) + 1)


@pytest.mark.parametrize("kind,name", TOWERS)
def test_grad_checkpointing_same_gradients(kind: str, name: str) -> None:
    tower, x = _build(kind, name)
    tower.train()  # checkpointing only engages in training for some trunks; tiny specs have no dropout
    twin = copy.deepcopy(tower)
    twin.set_grad_checkpointing(True)
    for model in (tower, twin):
        out = model(x)
        (out.pooled.square().sum() + out.tokens.mean()).backward()
    for (n, p), q in zip(tower.named_parameters(), twin.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, n
            continue
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("kind,name", TOWERS)
def test_lock_freeze_norm_keeps_eval_outputs(kind: str, name: str) -> None:
    tower, x = _build(kind, name)
    before = tower.eval()(x).pooled
    tower.lock(freeze_norm=True)
    torch.testing.assert_close(tower.eval()(x).pooled, before, atol=1e-6, rtol=0)


def test_grad_checkpointing_updates_batchnorm_once() -> None:
    """The backward recompute of a checkpointed ResNet stage must not update BatchNorm statistics again."""
    tower, x = _build("image", "clip_resnet")
    twin = copy.deepcopy(tower)
    twin.set_grad_checkpointing(True)
    for model in (tower, twin):
        model.train()(x).pooled.sum().backward()
    for (key, value), other in zip(tower.state_dict().items(), twin.state_dict().values(), strict=True):
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(other, value, msg=key)


@pytest.mark.parametrize("name", ["clip_resnet", "timm"])
def test_lock_freeze_norm_keeps_batchnorm_statistics(name: str) -> None:
    tower, x = _build("image", name)
    stats = {k: v.clone() for k, v in tower.state_dict().items() if "running_mean" in k}
    assert stats, "this tower should have BatchNorm"
    tower.lock(freeze_norm=True)
    tower.train()(x)
    after = tower.state_dict()
    for key, value in stats.items():
        assert torch.equal(after[key], value), key
    # without freeze_norm, train mode moves the statistics
    tower, x = _build("image", name)
    tower.lock()
    tower.train()(x)
    assert any(not torch.equal(tower.state_dict()[k], v) for k, v in stats.items())


def test_text_trim_gives_identical_outputs() -> None:
    trimmed = randomize_(TEXT_TOWERS.build(TINY_TEXT["clip_text"]), seed=2).eval()
    full = copy.deepcopy(trimmed)
    full.trim = False
    ids = torch.zeros(B, 77, dtype=torch.long)
    ids[:, :16] = _text_input()
    a, b = trimmed(ids), full(ids)
    assert a.tokens.shape[1] == 16 and b.tokens.shape[1] == 77  # longest real sequence ends at position 15
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.tokens, b.tokens[:, :16], atol=1e-6, rtol=0)


def test_eot_pooling_uses_first_end_of_text() -> None:
    tower = randomize_(
        TEXT_TOWERS.build({**TINY_TEXT["clip_text"], "pool": "eot", "eot_token_id": 7}),
        seed=2,
    ).eval()
    ids = torch.tensor([[1, 5, 7, 7, 7, 7], [1, 5, 9, 9, 7, 7]])
    out = tower(ids)
    assert out.mask.sum(1).tolist() == [3, 5]
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(2), torch.tensor([2, 4])])


def test_patch_dropout_keeps_class_token_and_fraction() -> None:
    tower = IMAGE_TOWERS.build({**TINY_IMAGE["clip_vit"], "patch_dropout": 0.5})
    x = _image_input(tower)
    assert tower.train()(x).tokens.shape[1] == 8  # 16 patches -> max(1, int(16 * 0.5))
    assert tower.eval()(x).tokens.shape[1] == 16
    no_drop = copy.deepcopy(tower)
    no_drop.patch_dropout = 0.0
    torch.testing.assert_close(tower.eval()(x).pooled, no_drop.eval()(x).pooled)


def test_resample_pos_embed_identity_and_shape() -> None:
    from mmclip.towers.image.clip_vit import resample_pos_embed

    pe = torch.randn(1 + 16, 8)
    assert torch.equal(resample_pos_embed(pe, (4, 4)), pe)
    up = resample_pos_embed(pe, (6, 6))
    assert up.shape == (37, 8) and torch.equal(up[0], pe[0])
    # a constant grid stays constant under bicubic resampling
    const = torch.ones(17, 8)
    torch.testing.assert_close(resample_pos_embed(const, (7, 7))[1:], torch.ones(49, 8))


def test_load_at_other_resolution_resamples_positions() -> None:
    from mmclip.models.convert import load_checkpoint

    small = mmclip.create_model("tiny-vit")
    big = mmclip.create_model("tiny-vit", image_tower={"image_size": 48})
    load_checkpoint(big, small.state_dict())
    assert big.image_tower.pos_embed.shape == (1 + 36, 64)
    out = big.eval().encode_image(torch.randn(1, 3, 48, 48))
    assert out.shape == (1, 32)


def test_timm_vit_tokens_drop_prefix_and_image_size_reaches_trunk() -> None:
    tower = IMAGE_TOWERS.build({"name": "timm", "model_name": "test_vit", "image_size": 64})
    out = tower.eval()(torch.randn(2, 3, 64, 64))
    patches = (64 // tower.trunk.patch_embed.patch_size[0]) ** 2
    assert tower.data_config.image_size == (64, 64)
    assert out.tokens.shape[1] == patches and out.pooled.shape == (2, tower.output_dim)
