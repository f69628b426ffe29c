"""Hugging Face CLIPModel / SiglipModel directories load into mmclip with the same features; export round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmclip
from tests.conftest import randomize_

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def _features(out: object) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features, 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out  # type: ignore[union-attr]


def _small_configs(vocab: int, positions: int, hidden: int, **text_extra: object) -> tuple[dict, dict]:
    """(text_config, vision_config) of a 2-layer, 64-wide, 2-head model on 32 px images."""
    common = {
        "hidden_size": 64,
        "intermediate_size": hidden,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
    }
    text = {**common, "vocab_size": vocab, "max_position_embeddings": positions, **text_extra}
    vision = {**common, "image_size": 32, "patch_size": 8}
    if "hidden_act" in text_extra:
        vision["hidden_act"] = text_extra["hidden_act"]
    return text, vision


def _small_clip(eos_token_id: int = 49407, act: str = "quick_gelu") -> object:
    text, vision = _small_configs(49408, 77, 256, eos_token_id=eos_token_id, hidden_act=act)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    return randomize_(transformers.CLIPModel(cfg), seed=3).eval()


def _assert_same_features(
    mm: mmclip.DualEncoder, hf: object, images: torch.Tensor, ids: torch.Tensor
) -> None:
    """mmclip's normalised embeddings and logit scale equal transformers' (get_*_features)."""
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        ref_img = normalize(_features(hf.get_image_features(pixel_values=images)), dim=-1)
        ref_txt = normalize(_features(hf.get_text_features(input_ids=ids)), dim=-1)
        torch.testing.assert_close(mm.encode_image(images, normalize=True), ref_img, atol=TOL, rtol=0)
        torch.testing.assert_close(mm.encode_text(ids, normalize=True), ref_txt, atol=TOL, rtol=0)
        torch.testing.assert_close(mm.logit_scale, hf.logit_scale.reshape(()))


def _ids(n: int = 4, length: int = 20, eot: int = 49407, vocab: int = 49406) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    ids[:, 0] = 49406 if vocab > 49406 else 0
    for i, end in enumerate([5, 19, 1, 10][:n]):
        ids[i, end] = eot
        ids[i, end + 1 :] = 0
    return ids


@pytest.mark.parametrize("eos_token_id,act", [(49407, "quick_gelu"), (2, "gelu")])
def test_hf_clip_from_pretrained(tmp_path: Path, eos_token_id: int, act: str) -> None:
    hf = _small_clip(eos_token_id, act)
    hf.save_pretrained(tmp_path)
    mm = mmclip.from_pretrained(tmp_path).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _assert_same_features(mm, hf, images, _ids())


def test_hf_siglip_from_pretrained(tmp_path: Path) -> None:
    text, vision = _small_configs(1000, 64, 128)
    cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
    hf = randomize_(transformers.SiglipModel(cfg), seed=5).eval()
    hf.save_pretrained(tmp_path)
    mm = mmclip.from_pretrained(tmp_path).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 1000, (3, 64), generator=torch.Generator().manual_seed(1))
    _assert_same_features(mm, hf, images, ids)
    torch.testing.assert_close(mm.logit_bias, hf.logit_bias.reshape(()))
    assert mm.data_config.mean == (0.5, 0.5, 0.5) and mm.data_config.resize_mode == "squash"


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-vit-quickgelu"])
def test_export_hf_round_trip(tmp_path: Path, name: str) -> None:
    mm = randomize_(mmclip.create_model(name), seed=11).eval()
    mmclip.export_hf(mm, tmp_path)
    hf = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids = _ids(n=4)
    with torch.no_grad():
        torch.testing.assert_close(
            _features(hf.get_image_features(pixel_values=images)), mm.encode_image(images), atol=TOL, rtol=0
        )
        torch.testing.assert_close(
            _features(hf.get_text_features(input_ids=ids)), mm.encode_text(ids), atol=TOL, rtol=0
        )
    back = mmclip.from_pretrained(tmp_path)
    ours, theirs = mm.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_export_rejects_non_clip_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be exported"):
        mmclip.export_hf(mmclip.create_model("tiny-resnet"), tmp_path)


def test_mmclip_save_pretrained_round_trip(tmp_path: Path) -> None:
    for name in ["tiny-vit", "tiny-resnet", "tiny-siglip", "tiny-bert"]:
        mm = randomize_(mmclip.create_model(name), seed=4).eval()
        mm.save_pretrained(tmp_path / name)
        back = mmclip.from_pretrained(tmp_path / name).eval()
        for key, value in mm.state_dict().items():
            assert torch.equal(value, back.state_dict()[key]), (name, key)
