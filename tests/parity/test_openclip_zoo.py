"""OpenCLIP's model zoo: every architecture mmclip names equals OpenCLIP's config, and each converter branch
loads with parity (normalized embeddings within 1e-5, fp32, random weights) through an OpenCLIP directory.

``benchmarks/openclip_zoo.py`` runs the same check over every name (README: "OpenCLIP model zoo").
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import mmclip
from mmclip.models.configs import BUILTIN_MODELS, MODEL_CONFIGS, MODEL_TOKENIZERS, OPENCLIP_MODELS_FILE
from tests.conftest import randomize_

open_clip = pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("openclip_zoo", ROOT / "benchmarks" / "openclip_zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def test_at_least_120_openclip_architectures_are_mmclip_names():
    names = set(open_clip.list_models())
    named = names & set(MODEL_CONFIGS)
    assert len(named) >= 120, sorted(names - named)


@pytest.mark.parametrize("name", sorted(set(open_clip.list_models()) - BUILTIN_MODELS))
def test_each_named_architecture_is_openclips_config(name):
    """The shipped table equals a fresh conversion of the installed OpenCLIP's config (or says why not)."""
    from mmclip.models.convert.openclip import openclip_tokenizer, spec_from_openclip_config

    if name not in MODEL_CONFIGS:
        pytest.skip(f"{name}: not loaded with parity (see the README's zoo table)")
    cfg = open_clip.get_model_config(name)
    fresh = json.loads(json.dumps(spec_from_openclip_config(cfg, zoo.pretrained_preprocess(name))))
    assert mmclip.get_model_config(name) == fresh
    assert MODEL_TOKENIZERS.get(name, "clip") == openclip_tokenizer(cfg)


# one architecture per converter branch
BRANCHES = [
    "ViT-B-32-quickgelu",  # native ViT, QuickGELU
    "RN50",  # modified ResNet
    "ViT-B-16-SigLIP2",  # timm SigLIP ViT -> native ViT with MAP pool; gelu-tanh text, last-token pool
    "ViT-SO400M-16-SigLIP-i18n-256",  # text without a projection
    "ViT-L-14-CLIPA",  # LayerNorm after the average pool; BERT-vocabulary text pooled at the last token
    "ViT-H-14-worldwide",  # text pooled at the first eos id
    "EVA02-B-16",  # timm trunk, token pool, its own head as the projection
    "PE-Core-B-16",  # timm trunk with rotary embeddings and a MAP pool
    "convnext_large_d",  # timm convnet with an MLP projection
    "ViTamin-S",  # a timm hybrid ViT at full size (no shrinking arguments)
]


@pytest.mark.parametrize("name", BRANCHES)
def test_converter_branch_loads_with_parity(name):
    cfg = open_clip.get_model_config(name)
    row = zoo.check(name, cfg, small=zoo._timm_small_ok(cfg))
    assert row["status"] == "parity", row
    assert max(row["image_diff"], row["text_diff"]) <= 1e-5


def test_unsupported_architectures_say_why():
    for name in ("coca_ViT-B-32", "roberta-ViT-B-32"):
        row = zoo.check(name, open_clip.get_model_config(name), small=True)
        assert row["status"] == "not supported" and row["why"], row


def test_named_models_carry_openclips_preprocessing_and_tokenizer():
    siglip2 = mmclip.get_model_config("ViT-B-16-SigLIP2")
    assert tuple(siglip2["image_tower"]["mean"]) == tuple(siglip2["image_tower"]["std"]) == (0.5,) * 3
    assert siglip2["image_tower"]["resize_mode"] == "squash"
    assert MODEL_TOKENIZERS["ViT-B-16-SigLIP2"] == {"name": "timm/ViT-B-16-SigLIP2", "clean": "canonicalize"}
    assert siglip2["text_tower"]["context_length"] == 64 and siglip2["text_tower"]["vocab_size"] == 256000
    mobile = mmclip.get_model_config("MobileCLIP-S1")["image_tower"]
    assert tuple(mobile["mean"]) == (0.0, 0.0, 0.0) and mobile["interpolation"] == "bilinear"
    assert OPENCLIP_MODELS_FILE.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2-256"])
def test_full_size_siglip2_from_a_weights_file_matches_openclip(name, tmp_path):
    """The names road at full size: mmclip.create_model(name, pretrained=<OpenCLIP weights file>)."""
    oc = open_clip.create_model(name).eval()
    randomize_(oc, 0)
    path = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, path)
    mm = mmclip.create_model(name, pretrained=str(path)).eval()
    size = mm.data_config.image_size
    assert tuple(size) == tuple(oc.visual.image_size)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    ids = zoo._token_ids(open_clip.get_model_config(name)["text_cfg"], 2, 0)
    with torch.no_grad():
        torch.testing.assert_close(
            mm.encode_image(images, normalize=True), oc.encode_image(images, normalize=True), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            mm.encode_text(ids, normalize=True), oc.encode_text(ids, normalize=True), atol=1e-5, rtol=0
        )
