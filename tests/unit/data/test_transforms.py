"""Transforms: eval against torchvision's composition, train crop sampling, augmentation, determinism."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from mmclip.data.transforms import image_transform, random_resized_crop_params
from mmclip.towers.base import OPENAI_MEAN, OPENAI_STD, DataConfig
from tests.unit.data.corpus import noise_image

CFG = DataConfig(image_size=(32, 32))


def _img(w: int = 50, h: int = 40) -> Image.Image:
    return noise_image(max(w, h)).crop((0, 0, w, h))


def _normalize(img: Image.Image) -> torch.Tensor:
    return T.Normalize(OPENAI_MEAN, OPENAI_STD)(T.ToTensor()(img))


def test_eval_shortest_matches_torchvision():
    ours = image_transform(CFG, train=False)
    ref = T.Compose(
        [
            T.Resize(32, T.InterpolationMode.BICUBIC),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    for w, h in [(50, 40), (40, 50), (32, 32), (17, 90)]:
        img = _img(w, h)
        out = ours(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
        assert torch.equal(out, ref(img))


def test_eval_squash_matches_torchvision():
    cfg = DataConfig(image_size=(24, 40), mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    ref = T.Compose(
        [T.Resize((24, 40), T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    )
    img = _img(50, 40)
    assert torch.equal(image_transform(cfg, train=False)(img), ref(img))


def test_default_config_and_validation():
    assert image_transform(None, train=False)(_img()).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="interpolation"):
        image_transform(DataConfig(interpolation="cubic"), train=False)
    with pytest.raises(ValueError, match="resize_mode"):
        image_transform(DataConfig(resize_mode="crop"), train=False)
    with pytest.raises(ValueError, match="scale"):
        image_transform(CFG, train=True, scale=(0.5, 1.5))


def test_crop_params_follow_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(100, 80, (0.3, 0.6), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 80 - h and 0 <= left <= 100 - w
        assert 0.3 * 8000 * 0.9 <= h * w <= 0.6 * 8000 * 1.1  # rounding of w and h
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_crop_params_fallback_is_central():
    # a 400 x 10 strip cannot hold a crop of aspect <= 4/3 and 90% area: central crop of max aspect
    assert random_resized_crop_params(400, 10, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (
        0,
        193,
        10,
        13,
    )
    assert random_resized_crop_params(10, 10, (1.0, 1.0), (1.0, 1.0), random.Random(0)) == (0, 0, 10, 10)


def test_crop_params_distribution_matches_torchvision():
    # same algorithm: the mean crop area and aspect agree with torchvision's sampler over many draws
    torch.manual_seed(0)
    img, rng, n = Image.new("RGB", (120, 90)), random.Random(0), 3000
    ours = [random_resized_crop_params(120, 90, (0.5, 1.0), (3 / 4, 4 / 3), rng) for _ in range(n)]
    ref = [T.RandomResizedCrop.get_params(img, [0.5, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]

    def mean(params, stat):
        return sum(stat(*p) for p in params) / n

    area_ours, area_ref = mean(ours, lambda top, left, h, w: h * w), mean(ref, lambda top, left, h, w: h * w)
    assert abs(area_ours - area_ref) < 0.02 * area_ref
    aspect_ours, aspect_ref = (
        mean(ours, lambda top, left, h, w: math.log(w / h)),
        mean(ref, lambda top, left, h, w: math.log(w / h)),
    )
    assert abs(aspect_ours - aspect_ref) < 0.02


def test_train_transform_is_crop_then_resize_exactly():
    img = _img(60, 45)
    transform = image_transform(CFG, train=True, scale=(0.5, 1.0))
    out = transform(img, random.Random(7))
    top, left, h, w = random_resized_crop_params(60, 45, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(7))
    ref = _normalize(TF.resized_crop(img, top, left, h, w, [32, 32], T.InterpolationMode.BICUBIC))
    assert torch.equal(out, ref)
    assert torch.equal(transform(img, random.Random(7)), out)
    assert not torch.equal(transform(img, random.Random(8)), out)


def test_grayscale_and_jitter():
    img = _img()
    gray = image_transform(CFG, train=True, grayscale_p=1.0)(img, random.Random(0))
    raw = gray * torch.tensor(OPENAI_STD).view(3, 1, 1) + torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)
    plain = image_transform(CFG, train=True)(img, random.Random(3))
    jitter = image_transform(CFG, train=True, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=1.0)
    a, b = jitter(img, random.Random(3)), jitter(img, random.Random(3))
    assert torch.equal(a, b) and not torch.equal(a, plain)
    off = image_transform(CFG, train=True, color_jitter=0.4, color_jitter_p=0.0)
    assert torch.equal(off(img, random.Random(3)), plain)


def test_non_rgb_input_converted():
    out = image_transform(CFG, train=False)(_img().convert("L"))
    assert out.shape == (3, 32, 32)
    assert torch.allclose(
        out[0] * OPENAI_STD[0] + OPENAI_MEAN[0], out[1] * OPENAI_STD[1] + OPENAI_MEAN[1], atol=1e-5
    )
