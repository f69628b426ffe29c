"""Bad input raises errors that name the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmclip
from mmclip.models.convert import CheckpointError, load_state_dict


def test_unknown_model_name() -> None:
    with pytest.raises(KeyError) as err:
        mmclip.create_model("ViT-B-33")
    assert "Did you mean 'ViT-B-32'" in str(err.value) and "RN50" in str(err.value)


def test_unknown_tower_name_in_spec() -> None:
    with pytest.raises(KeyError, match="unknown image tower 'resnet50'.*Known: "):
        mmclip.DualEncoder({"name": "resnet50"}, {"name": "clip_text"})


def test_unknown_timm_model() -> None:
    with pytest.raises(KeyError, match="unknown timm model 'convnext_tinyy'.*closest"):
        mmclip.IMAGE_TOWERS.build({"name": "timm", "model_name": "convnext_tinyy"})


def test_unknown_config_key() -> None:
    with pytest.raises(TypeError, match="patchsize"):
        mmclip.create_model("tiny-vit", image_tower={"patchsize": 4})


def test_wrong_image_size() -> None:
    model = mmclip.create_model("tiny-vit")
    with pytest.raises(ValueError, match=r"expects images of 32x32, got \(64, 64\)"):
        model.encode_image(torch.randn(1, 3, 64, 64))
    model = mmclip.create_model("tiny-resnet")
    with pytest.raises(ValueError, match=r"expects images of 64x64"):
        model.encode_image(torch.randn(1, 3, 32, 32))


def test_too_long_text() -> None:
    model = mmclip.create_model("tiny-vit")
    with pytest.raises(ValueError, match="exceeds context_length 77"):
        model.encode_text(torch.zeros(1, 80, dtype=torch.long))


def test_wrong_checkpoint_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "vit.pt"
    torch.save(mmclip.create_model("tiny-vit").state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        mmclip.create_model("tiny-resnet", pretrained=path)
    msg = str(err.value)
    assert "missing keys" in msg and "image_tower.stem.conv1.weight" in msg
    assert "unexpected keys" in msg and "image_tower.patch_embed.weight" in msg


def test_wrong_shapes_listed(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file(mmclip.create_model("tiny-vit", embed_dim=16).state_dict(), str(path))
    with pytest.raises(
        CheckpointError, match=r"image_proj.weight: checkpoint \(16, 64\) vs model \(32, 64\)"
    ):
        mmclip.create_model("tiny-vit", pretrained=path)


def test_foreign_keys_listed() -> None:
    from mmclip.models.convert import convert_openclip_state_dict

    with pytest.raises(CheckpointError, match="match no OpenAI/OpenCLIP layout.*decoder.weight"):
        convert_openclip_state_dict({"decoder.weight": torch.zeros(1)})


class _Evil:
    def __reduce__(self):  # would run on unpickling without weights_only
        return (print, ("pickle code ran",))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Evil()}, path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_state_dict(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="not a model directory: expected mmclip_config.json"):
        mmclip.from_pretrained(tmp_path)


def test_projection_none_needs_matching_width() -> None:
    with pytest.raises(ValueError, match="projection 'none' needs the tower width"):
        mmclip.create_model("tiny-vit", image_proj="none")
