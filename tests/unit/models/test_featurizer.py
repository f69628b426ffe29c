"""Featurizer: equal to each tower's own forward, intermediates equal to hooks, and really frozen."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import mmclip
from mmclip.layers.perceiver import PerceiverResampler
from mmclip.models.factory import get_model_config
from mmclip.models.featurizer import Featurizer, FeaturizerOutput, FrozenWeightsError, TextFeaturizer
from mmclip.outputs import TowerOutput
from mmclip.registry import IMAGE_TOWERS, TEXT_TOWERS
from tests.conftest import randomize_

B = 3
IMAGE_SPECS = {
    "clip_vit": get_model_config("tiny-vit")["image_tower"],
    "clip_resnet": get_model_config("tiny-resnet")["image_tower"],
    "timm_convnext": get_model_config("tiny-convnext")["image_tower"],
    "timm_efficientnet": get_model_config("tiny-efficientnet")["image_tower"],
    "timm_vit": {"name": "timm", "model_name": "test_vit", "image_size": 32},
}
TEXT_SPECS = {
    "clip_text": {**get_model_config("tiny-vit")["text_tower"], "vocab_size": 1000},
    "hf_bert": get_model_config("tiny-bert")["text_tower"],
}


def _image_tower(name: str, seed: int = 1) -> tuple[nn.Module, torch.Tensor]:
    tower = randomize_(IMAGE_TOWERS.build(IMAGE_SPECS[name]), seed=seed).eval()
    h, w = tower.data_config.image_size
    return tower, torch.randn(B, 3, h, w, generator=torch.Generator().manual_seed(0))


def _text_ids() -> torch.Tensor:
    ids = torch.randint(1, 998, (B, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 5], ids[0, 6:] = 999, 0  # 999 = the largest id = end of text for argmax pooling; 0 = padding
    ids[1, 11] = 999
    ids[2, 8], ids[2, 9:] = 999, 0
    return ids


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name in IMAGE_SPECS:
        return _image_tower(name)
    return randomize_(TEXT_TOWERS.build(TEXT_SPECS[name]), seed=1).eval(), _text_ids()


def _hooked_blocks(name: str, tower: nn.Module) -> tuple[list[nn.Module], Callable]:
    """The modules whose outputs are the tower's intermediate layers, and how to turn one into tokens."""
    nchw = lambda o: o.flatten(2).transpose(1, 2)  # noqa: E731
    if name == "clip_vit":
        return list(tower.transformer.blocks), lambda o: o[:, tower.num_prefix :]
    if name == "clip_resnet":
        return list(tower.stages), nchw
    if name.startswith("timm"):
        prefix = getattr(tower.trunk, "num_prefix_tokens", 0)
        modules = [tower.trunk.get_submodule(f["module"]) for f in tower.trunk.feature_info]
        return modules, lambda o: nchw(o) if o.ndim == 4 else o[:, prefix:]
    if name == "clip_text":
        return list(tower.transformer.blocks), lambda o: o
    return list(tower.encoder.encoder.layer), lambda o: o[0] if isinstance(o, tuple) else o


ALL = [*IMAGE_SPECS, *TEXT_SPECS]


@pytest.mark.parametrize("name", ALL)
def test_outputs_equal_tower_forward_and_hooked_blocks(name: str) -> None:
    tower, x = _build(name)
    reference = copy.deepcopy(tower)
    blocks, to_tokens = _hooked_blocks(name, reference)
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, to_tokens(out)))
    with torch.no_grad():
        ref = reference(x)
    layers = [-1, 0, -2]

    plain = Featurizer(tower, output="both")(x)
    with_layers = Featurizer(copy.deepcopy(tower), output="both", layers=layers)(x)
    for out in (plain, with_layers):
        assert isinstance(out, FeaturizerOutput)
        torch.testing.assert_close(out.pooled, ref.pooled, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.tokens, ref.tokens, rtol=0, atol=1e-6)
        assert out.mask.dtype == torch.bool and out.mask.shape == out.tokens.shape[:2]
        if ref.mask is None:
            assert out.mask.all()
        else:
            assert torch.equal(out.mask, ref.mask)
    assert plain.layers is None
    assert len(with_layers.layers) == len(layers)
    for index, got in zip(layers, with_layers.layers, strict=True):
        torch.testing.assert_close(got, seen[index % len(blocks)], rtol=0, atol=1e-6)
    featurizer = Featurizer(copy.deepcopy(tower))
    assert featurizer.token_dim == ref.tokens.shape[-1] and featurizer.output_dim == ref.pooled.shape[-1]


def test_modality_and_outputs_selected() -> None:
    vit, x = _build("clip_vit")
    text, ids = _build("clip_text")
    assert Featurizer(vit).modality == "image" and Featurizer(text).modality == "text"
    pooled = Featurizer(copy.deepcopy(vit), output="pooled")(x)
    assert pooled.pooled is not None and pooled.tokens is None and pooled.mask is None
    tokens = TextFeaturizer(copy.deepcopy(text), output="tokens")(ids)
    assert tokens.pooled is None and tokens.tokens.shape[:2] == tokens.mask.shape
    assert (~tokens.mask).any()  # padding is marked


def test_dual_encoder_projection_and_modality() -> None:
    model = randomize_(mmclip.create_model("tiny-vit", text_tower={"vocab_size": 1000}), seed=3).eval()
    images, ids = torch.randn(B, 3, 32, 32), _text_ids()
    with torch.no_grad():
        image_embeds = model.encode_image(images, normalize=True)
        image_pooled = model.image_tower(images).pooled
        text_embeds = model.encode_text(ids)
        text_tokens = model.text_tower(ids).tokens

    projected = Featurizer(model, output="pooled", project=True, normalize=True)
    assert projected.output_dim == model.embed_dim and projected.token_dim == 64
    torch.testing.assert_close(projected(images).pooled, image_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(Featurizer(model)(images).pooled, image_pooled, rtol=0, atol=1e-6)
    assert any(p.requires_grad for p in model.text_tower.parameters())  # only the image side is frozen

    assert Featurizer(model).data_config == model.data_config
    built = Featurizer.from_pretrained("tiny-vit", output="pooled", project=True)
    assert built.output_dim == 32 and built(images).pooled.shape == (B, 32)

    text = TextFeaturizer(model, project=True)
    out = text(ids)
    torch.testing.assert_close(out.pooled, text_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.tokens, text_tokens, rtol=0, atol=1e-6)  # tokens are never projected
    assert not any(p.requires_grad for p in model.text_tower.parameters())
    assert not hasattr(text, "data_config")


class _Parent(nn.Module):
    """A trainable head on a frozen featurizer, as a downstream model would build it."""

    def __init__(self, featurizer: Featurizer) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.token_head = nn.Linear(featurizer.token_dim, 4)
        self.pooled_head = nn.Linear(featurizer.output_dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.featurizer(x)
        return self.token_head(out.tokens.mean(dim=1)) + self.pooled_head(out.pooled)


def _frozen_state(featurizer: Featurizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in featurizer.frozen.state_dict().items()}


@pytest.mark.parametrize("name", ["clip_resnet", "timm_efficientnet"])  # both have BatchNorm statistics
def test_training_a_head_leaves_the_frozen_tower_untouched(name: str) -> None:
    tower, x = _build(name)
    parent = _Parent(Featurizer(tower))
    featurizer = parent.featurizer
    frozen_ids = {id(p) for p in featurizer.frozen.parameters()}
    head_ids = {id(p) for m in (parent.token_head, parent.pooled_head) for p in m.parameters()}
    assert frozen_ids and not any(p.requires_grad for p in featurizer.frozen.parameters())
    assert {id(p) for p in parent.parameters()} == head_ids
    assert not list(featurizer.parameters())

    optimizer = torch.optim.AdamW(parent.parameters(), lr=1e-2, weight_decay=0.1)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == head_ids
    before = _frozen_state(featurizer)
    assert any("running_mean" in k for k in before)
    head_before = parent.token_head.weight.detach().clone()
    features_before = featurizer(x).tokens

    parent.train()
    parent.requires_grad_(True)  # does not reach the frozen tower, and neither does an init
    parent.apply(lambda m: nn.init.zeros_(m.weight) if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) else None)
    assert parent.training and not any(m.training for m in featurizer.frozen.modules())
    for _ in range(3):
        loss = parent(x).square().mean()
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in featurizer.frozen.parameters())
        optimizer.step()
        optimizer.zero_grad()

    assert not torch.equal(parent.token_head.weight, head_before)
    after = featurizer.frozen.state_dict()
    for key, value in before.items():  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(after[key], value), key
    torch.testing.assert_close(featurizer(x).tokens, features_before, rtol=0, atol=0)
    featurizer.verify_unchanged()

    featurizer.tower.train()  # flipped directly on the tower: the next forward puts it back
    featurizer(x)
    assert not featurizer.tower.training


def test_verify_unchanged_names_what_changed() -> None:
    tower, x = _build("clip_resnet")
    featurizer = Featurizer(tower)
    featurizer.verify_unchanged()
    weight = featurizer.tower.stages[0][0].conv1.conv.weight
    with torch.no_grad():  # one ulp is enough
        weight[0, 0, 0, 0] = torch.nextafter(weight[0, 0, 0, 0], torch.tensor(float("inf")))
    with pytest.raises(
        FrozenWeightsError, match=r"1 frozen tensor.*tower\.stages\.0\.0\.conv1\.conv\.weight"
    ):
        featurizer.verify_unchanged()
    featurizer.record_fingerprint()  # accepted on purpose
    featurizer.verify_unchanged()

    running = featurizer.tower.stages[1][0].conv2.bn.running_mean
    with torch.no_grad():
        running[[0, 1]] = running[[1, 0]].clone()  # a swap keeps every sum the same
    with pytest.raises(FrozenWeightsError, match=r"stages\.1\.0\.conv2\.bn\.running_mean"):
        featurizer.verify_unchanged()


@pytest.mark.parametrize("chunk", [1 << 22, 128])  # one pass, and several passes with a ragged end
def test_fingerprint_is_the_closed_form_weighted_sum(chunk: int, monkeypatch) -> None:
    from mmclip.models import featurizer as module

    monkeypatch.setattr(module, "_PASS", chunk)
    views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    tensors = [
        torch.randn(1000),
        torch.randn(37, 5, dtype=torch.float64),
        torch.randn(300).bfloat16(),
        torch.arange(-5, 200),
        torch.rand(77) > 0.5,
        torch.tensor(3),
    ]
    for t in tensors:
        flat = t.reshape(-1)
        flat = flat.to(torch.uint8) if flat.dtype == torch.bool else flat
        bits = flat.view(views[flat.element_size()]) if flat.is_floating_point() else flat
        expected = sum((i + 1) * int(b) for i, b in enumerate(bits.tolist())) % (2**31 - 1)
        assert int(module._tensor_fingerprint(t)) == expected, t.dtype
    x = torch.randn(4, 64)
    y = x.clone()
    y[0, 1], y[1, 0] = x[1, 0], x[0, 1]  # a swap across rows of the hash's layout
    assert module._tensor_fingerprint(x) != module._tensor_fingerprint(y)


def test_state_dict_holds_only_the_fingerprint_and_checks_it_on_load() -> None:
    tower, x = _build("clip_vit")
    parent = _Parent(Featurizer(tower))
    state = parent.state_dict()
    assert [k for k in state if k.startswith("featurizer.")] == ["featurizer.fingerprint"]

    same = _Parent(Featurizer(copy.deepcopy(tower)))
    same.load_state_dict(state)  # same frozen weights: loads

    other = _Parent(Featurizer(_image_tower("clip_vit", seed=2)[0]))
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="frozen image featurizer weights differ"):
            other.load_state_dict(state, strict=strict)
    state.pop("featurizer.fingerprint")  # the documented way to load it anyway
    result = other.load_state_dict(state, strict=False)
    assert result.missing_keys == ["featurizer.fingerprint"]
    other.featurizer.verify_unchanged()  # its own fingerprint was kept


def test_moves_and_casts_reach_the_frozen_tower() -> None:
    tower, x = _build("clip_vit")
    parent = _Parent(Featurizer(tower))
    reference = parent.featurizer(x).tokens
    parent.to(torch.float64)  # a cast re-records the fingerprint
    assert all(p.dtype == torch.float64 for p in parent.featurizer.frozen.parameters())
    parent.featurizer.verify_unchanged()
    out = parent.featurizer(x.double()).tokens
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=1e-5)
    twin = copy.deepcopy(parent)
    assert twin.featurizer.tower is not parent.featurizer.tower
    torch.testing.assert_close(twin.featurizer(x.double()).tokens, out, rtol=0, atol=0)


def test_autocast_and_channels_last() -> None:
    tower, x = _build("clip_vit")
    reference = copy.deepcopy(tower)(x)
    lowp = Featurizer(copy.deepcopy(tower), autocast_dtype="bf16", layers=[0])(x)
    assert lowp.tokens.dtype == lowp.layers[0].dtype == torch.bfloat16
    cast = Featurizer(tower, autocast_dtype=torch.bfloat16, output_dtype="float32", layers=[0])(x)
    assert cast.tokens.dtype == cast.pooled.dtype == cast.layers[0].dtype == torch.float32
    torch.testing.assert_close(cast.tokens, reference.tokens, rtol=0.05, atol=0.05)

    tower, x = _build("timm_convnext")
    reference = copy.deepcopy(tower)(x)
    featurizer = Featurizer(tower, channels_last=True)
    conv = next(m for m in featurizer.tower.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    featurizer.verify_unchanged()  # memory format does not change the fingerprint
    out = featurizer(x)
    torch.testing.assert_close(out.tokens, reference.tokens, rtol=1e-5, atol=1e-5)


def test_tokens_feed_a_perceiver_resampler() -> None:
    text, ids = _build("hf_bert")
    featurizer = TextFeaturizer(text, output="tokens")
    resampler = PerceiverResampler(dim=featurizer.token_dim, depth=1, num_latents=4, heads=2, dim_head=8)
    out = featurizer(ids)
    latents = resampler(out.tokens, mask=out.mask)
    assert latents.shape == (B, 1, 4, featurizer.token_dim)
    latents.sum().backward()
    assert all(p.grad is not None for p in resampler.parameters())
    assert all(p.grad is None for p in featurizer.frozen.parameters())


class _NoIntermediates(nn.Module):
    output_dim = 4

    def forward(self, x: torch.Tensor) -> TowerOutput:
        return TowerOutput(pooled=x, tokens=x[:, None])


def test_errors_are_clear() -> None:
    vit, x = _build("clip_vit")
    with pytest.raises(ValueError, match="output must be one of"):
        Featurizer(vit, output="all")
    with pytest.raises(ValueError, match="project=True needs a DualEncoder"):
        Featurizer(vit, project=True)
    with pytest.raises(TypeError, match="wraps a tower"):
        Featurizer(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="sequence of block indices"):
        Featurizer(vit, layers=-2)
    with pytest.raises(ValueError, match="at least one"):
        Featurizer(vit, layers=[])
    with pytest.raises(ValueError, match="modality 'image', but modality='text'"):
        TextFeaturizer(vit)
    with pytest.raises(TypeError, match="no forward_intermediates"):
        Featurizer(_NoIntermediates(), layers=[0])
    with pytest.raises(IndexError, match="out of range for 2 layers"):
        Featurizer(vit, layers=[2])(x)
    with pytest.raises(ValueError, match="unknown dtype"):
        Featurizer(vit, autocast_dtype="fp8")
