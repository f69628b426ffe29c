"""Tensor-exact parity of mmclip's eval transform with open_clip's, on the real photos scikit-image ships."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")
skdata = pytest.importorskip("skimage.data")

from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402

from mmclip import get_model_config  # noqa: E402
from mmclip.data.transforms import image_transform  # noqa: E402
from mmclip.towers.base import DataConfig  # noqa: E402


def _photos() -> dict[str, Image.Image]:
    rgb = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"]
    gray = ["camera", "coins", "text"]
    photos = {name: Image.fromarray(getattr(skdata, name)()) for name in rgb + gray}
    photos["logo_rgba"] = Image.fromarray(skdata.logo())  # real transparency
    astronaut = skdata.astronaut()
    alpha = np.tile(np.linspace(0, 255, astronaut.shape[1]).astype(np.uint8), (astronaut.shape[0], 1))
    photos["astronaut_rgba"] = Image.fromarray(np.dstack([astronaut, alpha]), "RGBA")
    photos["chelsea_gray"] = photos["chelsea"].convert("L")
    photos["coffee_small"] = photos["coffee"].resize((150, 100))  # upsampled to the target
    return photos


PHOTOS = _photos()
SIGLIP = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash")


def _assert_exact(ours, theirs) -> None:
    for name, img in PHOTOS.items():
        a, b = ours(img), theirs(img)
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() == 0.0, name


@pytest.mark.parametrize("size", [224, (160, 256)])
def test_center_crop_openai_exact(size):
    hw = (size, size) if isinstance(size, int) else size
    ours = image_transform(DataConfig(image_size=hw), train=False)
    theirs = open_clip.image_transform(size, is_train=False)
    _assert_exact(ours, theirs)


@pytest.mark.parametrize("size", [224, (96, 128)])
def test_squash_siglip_exact(size):
    hw = (size, size) if isinstance(size, int) else size
    ours = image_transform(DataConfig(image_size=hw, **SIGLIP), train=False)
    theirs = open_clip.image_transform(size, is_train=False, **SIGLIP)
    _assert_exact(ours, theirs)


def test_longest_and_bilinear_exact():
    ours = image_transform(DataConfig(image_size=(96, 96), resize_mode="longest"), train=False)
    _assert_exact(ours, open_clip.image_transform(96, is_train=False, resize_mode="longest"))
    ours = image_transform(DataConfig(image_size=(96, 96), interpolation="bilinear"), train=False)
    _assert_exact(ours, open_clip.image_transform(96, is_train=False, interpolation="bilinear"))


def test_model_preprocess_exact():
    """create_model_and_transforms' preprocess vs the transform of mmclip's own ViT-B-32 / SigLIP configs."""
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    tower = get_model_config("ViT-B-32")["image_tower"]
    ours = image_transform(DataConfig(image_size=(tower["image_size"],) * 2), train=False)
    _assert_exact(ours, preprocess)
    siglip = get_model_config("ViT-B-16-SigLIP")["image_tower"]
    cfg = DataConfig(
        (siglip["image_size"],) * 2, siglip["mean"], siglip["std"], "bicubic", siglip["resize_mode"]
    )
    theirs = image_transform_v2(PreprocessCfg(size=224, **SIGLIP), is_train=False)
    _assert_exact(image_transform(cfg, train=False), theirs)


def test_train_transform_matches_open_clip_with_same_crop():
    """Same crop box -> same tensor as open_clip's train transform (RandomResizedCrop, bicubic)."""
    import random

    from mmclip.data.transforms import random_resized_crop_params

    theirs = open_clip.image_transform(224, is_train=True)
    crop = theirs.transforms[0]
    ours = image_transform(DataConfig(), train=True)
    img = PHOTOS["rocket"]
    box = random_resized_crop_params(img.width, img.height, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(5))
    crop.get_params = lambda *args, **kwargs: box  # open_clip samples with torch's global RNG; pin the box
    assert torch.equal(ours(img, random.Random(5)), theirs(img))
