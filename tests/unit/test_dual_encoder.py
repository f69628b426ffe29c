"""DualEncoder behaviour, named configs and parameter counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import mmclip
from mmclip.models.convert import load_state_dict

# OpenAI CLIP parameter counts in millions (total, vision, text), see REFERENCE.md.
OPENAI_PARAMS = {
    "RN50": (102, 38.3, 63.1),
    "RN101": (120, 56.3, 63.1),
    "RN50x4": (178, 87.1, 90.7),
    "RN50x16": (291, 167.3, 123.0),
    "RN50x64": (623, 420.4, 201.8),
    "ViT-B-32": (151, 87.8, 63.1),
    "ViT-B-16": (150, 86.2, 63.1),
    "ViT-L-14": (428, 304.0, 123.0),
    "ViT-L-14-336": (428, 304.3, 123.0),
}


@pytest.mark.parametrize("name", sorted(OPENAI_PARAMS))
@pytest.mark.parametrize("suffix", ["", "-quickgelu"])
def test_parameter_counts_match_openai_table(name: str, suffix: str) -> None:
    with torch.device("meta"):
        model = mmclip.create_model(name + suffix)
    counts = mmclip.count_parameters(model)
    for key, ref in zip(("total", "image", "text"), OPENAI_PARAMS[name], strict=True):
        assert abs(counts[key] / 1e6 - ref) / ref <= 0.005, (key, counts[key], ref)


def test_compose_in_code_with_module_towers() -> None:
    from mmclip.towers import ClipTextTransformer, ClipVisionTransformer

    model = mmclip.DualEncoder(
        ClipVisionTransformer(image_size=32, patch_size=8, width=64, layers=1, heads=2),
        ClipTextTransformer(vocab_size=100, width=48, layers=1, heads=2, eot_token_id=99),
        embed_dim=16,
    )
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 10)))
    assert out.image_embeds.shape == out.text_embeds.shape == (2, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(2))
    assert model.config is None  # modules, not specs: save_pretrained explains what to do
    with pytest.raises(ValueError, match="save_pretrained needs towers built from specs"):
        model.save_pretrained("unused")


def test_logit_scale_and_bias_init() -> None:
    clip = mmclip.create_model("tiny-vit")
    assert math.isclose(clip.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert clip.logit_bias is None
    out = clip(torch.randn(1, 3, 32, 32), torch.randint(0, 100, (1, 5)))
    assert math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5)
    siglip = mmclip.create_model("tiny-siglip")
    assert math.isclose(siglip.logit_scale.exp().item(), 10.0, rel_tol=1e-6)
    assert siglip.logit_bias.item() == -10.0


def test_forward_equals_encode_and_output_by_hand() -> None:
    model = mmclip.create_model("tiny-vit", keep_tower_outputs=True).eval()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 49406, (2, 12))
    out = model(images, ids)
    torch.testing.assert_close(out.image_embeds, model.encode_image(images, normalize=True))
    torch.testing.assert_close(out.text_embeds, model.encode_text(ids, normalize=True))
    assert out.image_output is not None and out.image_output.tokens.shape == (2, 16, 64)
    by_hand = mmclip.DualEncoderOutput(out.image_embeds, out.text_embeds, out.logit_scale)
    assert by_hand.logit_bias is None
    only_text = model(text=ids)
    assert only_text.image_embeds.shape == (0, 32)


def test_create_model_overrides_merge() -> None:
    model = mmclip.create_model("tiny-vit", image_tower={"patch_dropout": 0.25}, embed_dim=8)
    assert model.image_tower.patch_dropout == 0.25 and model.embed_dim == 8
    assert model.image_tower.width == 64  # the rest of the named config is kept


def test_list_models() -> None:
    names = mmclip.list_models()
    assert {"ViT-B-16-SigLIP", "convnext_base", "efficientnet_b3", "ViT-B-32-BERT", "tiny-vit"} <= set(names)
    assert mmclip.list_models("RN50x*") == [
        "RN50x16",
        "RN50x16-quickgelu",
        "RN50x4",
        "RN50x4-quickgelu",
        "RN50x64",
        "RN50x64-quickgelu",
    ]


def test_pretrained_file_formats(tmp_path: Path) -> None:
    """A DDP-wrapped {'state_dict': {'module.*'}} .pt and a plain .bin load the same weights."""
    model = mmclip.create_model("tiny-vit")
    wrapped = {"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    torch.save(model.state_dict(), tmp_path / "ckpt.bin")
    for name in ("ckpt.pt", "ckpt.bin"):
        loaded = mmclip.create_model("tiny-vit", pretrained=tmp_path / name)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
    assert set(load_state_dict(tmp_path / "ckpt.pt")) == set(model.state_dict())


def test_openai_style_checkpoint_with_meta_keys(tmp_path: Path) -> None:
    """OpenAI state dicts carry input_resolution/context_length/vocab_size tensors: ignored."""
    open_clip = pytest.importorskip("open_clip")
    oc = open_clip.CLIP(
        32,
        {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        quick_gelu=True,
    )
    state = dict(
        oc.state_dict(),
        input_resolution=torch.tensor(32),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    torch.save(state, tmp_path / "openai.pt")
    model = mmclip.create_model("tiny-vit-quickgelu", pretrained=tmp_path / "openai.pt")
    torch.testing.assert_close(model.text_tower.pos_embed, oc.positional_embedding)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet", "tiny-siglip"])
def test_lock_image_tower_lit(name: str) -> None:
    model = mmclip.create_model(name)
    model.lock_image_tower()
    image_params = [*model.image_tower.parameters(), *model.image_proj.parameters()]
    assert not any(p.requires_grad for p in image_params)  # the image embedding is fully frozen
    assert all(p.requires_grad for p in model.text_tower.parameters())
    model = mmclip.create_model(name)
    model.lock_image_tower(lock_proj=False)
    assert all(p.requires_grad for p in model.image_proj.parameters())
