"""OpenCLIP models converted into mmclip give the same embeddings (fp32, max abs diff <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

import mmclip
from mmclip.models.convert import convert_openclip_state_dict, load_checkpoint
from tests.conftest import randomize_

open_clip = pytest.importorskip("open_clip")

TOL = 1e-5
CAPTIONS = ["a photo of a cat", "a small red circle to the left of a blue square", "", "x " * 100]


def _compare(oc: torch.nn.Module, mm: mmclip.DualEncoder, seed: int = 0) -> None:
    randomize_(oc, seed)
    load_checkpoint(mm, convert_openclip_state_dict(oc.state_dict()))
    oc.eval()
    mm.eval()
    size = mm.data_config.image_size
    images = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(seed))
    ids = open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(
            mm.encode_image(images, normalize=True), oc.encode_image(images, normalize=True), atol=TOL, rtol=0
        )
        torch.testing.assert_close(
            mm.encode_text(ids, normalize=True), oc.encode_text(ids, normalize=True), atol=TOL, rtol=0
        )
        torch.testing.assert_close(mm.logit_scale.exp(), oc.logit_scale.exp())


def _small_text() -> tuple[dict, dict]:
    oc = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    mm = {"name": "clip_text", "width": 64, "heads": 2, "layers": 2}
    return oc, mm


def _small_vit(oc_extra: dict | None = None, **mm_extra: object) -> tuple[dict, dict]:
    """The same small ViT as an OpenCLIP vision_cfg and an mmclip tower spec."""
    oc = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, **(oc_extra or {})}
    mm = {
        "name": "clip_vit",
        "image_size": 32,
        "patch_size": 8,
        "width": 64,
        "layers": 2,
        "heads": 2,
        **mm_extra,
    }
    return oc, mm


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_vit_small(quick_gelu: bool) -> None:
    oc_text, mm_text = _small_text()
    act = "quick_gelu" if quick_gelu else "gelu"
    oc_vit, mm_vit = _small_vit(act=act)
    oc = open_clip.CLIP(32, oc_vit, oc_text, quick_gelu=quick_gelu)
    mm = mmclip.DualEncoder(mm_vit, dict(mm_text, act=act), embed_dim=32)
    _compare(oc, mm)


def test_vit_mean_pool_and_layer_scale() -> None:
    oc_text, mm_text = _small_text()
    oc_vit, mm_vit = _small_vit({"pool_type": "avg", "ls_init_value": 0.1}, pool="mean", layer_scale_init=0.1)
    oc = open_clip.CLIP(32, oc_vit, oc_text)
    mm = mmclip.DualEncoder(mm_vit, mm_text, embed_dim=32)
    _compare(oc, mm)


def test_modified_resnet_small() -> None:
    oc_text, mm_text = _small_text()
    oc = open_clip.CLIP(32, {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8}, oc_text)
    mm = mmclip.DualEncoder(
        {"name": "clip_resnet", "layers": [1, 2, 1, 1], "width": 8, "output_dim": 32, "image_size": 64},
        mm_text,
        embed_dim=32,
        image_proj="none",
    )
    _compare(oc, mm)


@pytest.mark.parametrize(
    "model_name,pool,proj",
    [("test_convnext", "", "linear"), ("test_efficientnet", "avg", "mlp"), ("test_vit", "token", "none")],
)
def test_timm_tower(model_name: str, pool: str, proj: str) -> None:
    """timm trunks with OpenCLIP's heads: network default pool + linear, avg pool + MLP, a ViT with no proj."""
    oc_text, mm_text = _small_text()
    embed = 32
    if proj == "none":  # the trunk's features are the embedding
        import timm

        embed = timm.create_model(model_name).num_features
    vision = {
        "timm_model_name": model_name,
        "timm_model_pretrained": False,
        "timm_pool": pool,
        "timm_proj": proj,
        "image_size": 64 if model_name != "test_vit" else 160,
    }
    oc = open_clip.CLIP(embed, vision, oc_text)
    tower = {"name": "timm", "model_name": model_name, "image_size": vision["image_size"]}
    if pool:
        tower["pool"] = pool
    mm = mmclip.DualEncoder(tower, mm_text, embed_dim=embed, image_proj=proj)
    _compare(oc, mm)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_named_config(name: str) -> None:
    """The full-size named configs, once each: same module shapes as OpenCLIP's and the same embeddings."""
    oc = open_clip.create_model(name, pretrained=None)
    mm = mmclip.create_model(name)
    _compare(oc, mm, seed=1)


def test_openai_quickgelu_named_matches_openclip_quickgelu_names() -> None:
    """Every OpenAI name exists in both libraries, with a -quickgelu twin."""
    oc_names = set(open_clip.list_models())
    for name in [
        "RN50",
        "RN101",
        "RN50x4",
        "RN50x16",
        "RN50x64",
        "ViT-B-32",
        "ViT-B-16",
        "ViT-L-14",
        "ViT-L-14-336",
    ]:
        for variant in (name, name + "-quickgelu"):
            assert variant in mmclip.list_models()
            assert variant in oc_names


@pytest.mark.slow
def test_openclip_siglip_file_into_native_vit(tmp_path) -> None:
    """OpenCLIP's ViT-B-16-SigLIP (timm trunk, exact GELU) loads into the named config through a file."""
    oc = randomize_(open_clip.create_model("ViT-B-16-SigLIP", pretrained=None), seed=2).eval()
    torch.save(oc.state_dict(), tmp_path / "siglip.pt")
    # OpenCLIP runs this model with exact GELU; the named config follows big_vision / HF (tanh GELU).
    mm = mmclip.create_model(
        "ViT-B-16-SigLIP",
        pretrained=tmp_path / "siglip.pt",
        image_tower={"act": "gelu"},
        text_tower={"act": "gelu"},
    ).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 32000, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            mm.encode_image(images, normalize=True), oc.encode_image(images, normalize=True), atol=TOL, rtol=0
        )
        torch.testing.assert_close(
            mm.encode_text(ids, normalize=True), oc.encode_text(ids, normalize=True), atol=TOL, rtol=0
        )
        torch.testing.assert_close(mm.logit_bias, oc.logit_bias.reshape(()))
