"""NaFlex images: each image at its own aspect ratio, as a variable number of patches under a budget.

SigLIP 2's NaFlex variant resizes every image, keeping its aspect ratio, to the largest grid of whole patches
that fits ``max_num_patches``, and feeds the patches as a sequence. :class:`NaFlexPreprocess` does that to a
PIL image (pixel for pixel as ``transformers``' ``Siglip2ImageProcessor``); :func:`collate_images` pads a list
of such samples into one :class:`NaFlexImages` batch (and stacks plain image tensors, so that
``model.encode_image(collate_images([preprocess(im) for im in images]))`` embeds PIL images for every tower).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from mmclip.data.transforms import ImageTransform, random_resized_crop_params
from mmclip.towers.base import DataConfig
from mmclip.towers.image.naflex_vit import NaFlexImages, NaFlexSample, patchify

__all__ = ["NaFlexImages", "NaFlexPreprocess", "NaFlexSample", "collate_images", "naflex_size", "patchify"]


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """The (height, width) an image is resized to: both multiples of ``patch_size`` (at least one patch), the
    aspect ratio kept as nearly as whole patches allow, and the largest such size with at most
    ``max_num_patches`` patches. The scale is found by bisection to within ``eps``, as SigLIP 2's reference
    processor does, so that both give the same size."""

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = eps / 10, 100.0
    while high - low >= eps:
        mid = (low + high) / 2
        patches = (side(mid, height) / patch_size) * (side(mid, width) / patch_size)
        if patches <= max_num_patches:
            low = mid
        else:
            high = mid
    return side(low, height), side(low, width)


class NaFlexPreprocess:
    """PIL image -> :class:`NaFlexSample`: RGB, resized to :func:`naflex_size` (antialiased, on uint8 pixels),
    normalised, patchified.

    Called as ``preprocess(image)``, ``preprocess(image, rng)`` (the data pipeline's per-sample randomness) or
    ``preprocess(image, rng, max_num_patches)`` (a batch's own budget, below the default).

    Args:
        patch_size: the tower's patch size.
        max_num_patches: the patch budget per image.
        mean, std: normalisation of pixels in [0, 1].
        interpolation: "bilinear" (SigLIP 2) or "bicubic".
        train: before resizing, crop a random box of ``scale`` times the area whose aspect ratio is the
            image's own times a factor in ``ratio`` (so wide images stay wide), then apply the colour
            augmentation; evaluation (the default) keeps the whole image.
        scale, ratio, color_jitter, color_jitter_p, grayscale_p: the training augmentation (as
            :class:`mmclip.data.transforms.ImageTransform`).
    """

    def __init__(
        self,
        patch_size: int = 16,
        max_num_patches: int = 256,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        interpolation: str = "bilinear",
        train: bool = False,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float | Sequence[float] | None = None,
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.0,
    ) -> None:
        if patch_size < 1 or max_num_patches < 1:
            raise ValueError(f"patch_size and max_num_patches must be >= 1, got {patch_size}, {max_num_patches}")
        self.patch_size = patch_size
        self.max_num_patches = max_num_patches
        # normalise uint8-range pixels in one step: (x - 255 mean) / (255 std)
        self.mean = (torch.tensor(mean) * 255.0).tolist()
        self.std = (torch.tensor(std) * 255.0).tolist()
        self.interpolation = InterpolationMode(interpolation)
        self.train = train
        # the crop ranges and colour augmentation, checked and applied as the fixed-size transform does
        self._augment = ImageTransform(
            (patch_size, patch_size), mean, std, interpolation, train=True, scale=scale, ratio=ratio,
            color_jitter=color_jitter, color_jitter_p=color_jitter_p, grayscale_p=grayscale_p,
        )
        self.scale, self.ratio = self._augment.scale, self._augment.ratio

    def __call__(
        self, image: Image.Image, rng: random.Random | None = None, max_num_patches: int | None = None
    ) -> NaFlexSample:
        budget = self.max_num_patches if max_num_patches is None else int(max_num_patches)
        if self.train:
            rng = rng or random.Random()
            own = image.width / image.height
            top, left, h, w = random_resized_crop_params(
                image.width, image.height, self.scale, (own * self.ratio[0], own * self.ratio[1]), rng
            )
            image = self._augment._augment(image.crop((left, top, left + w, top + h)).convert("RGB"), rng)
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()  # (3, H, W)
        h, w = naflex_size(pixels.shape[1], pixels.shape[2], self.patch_size, budget)
        pixels = tvf.resize(pixels, [h, w], interpolation=self.interpolation, antialias=True)
        x = tvf.normalize(pixels.to(torch.float32), self.mean, self.std)
        return NaFlexSample(patchify(x, self.patch_size), (h // self.patch_size, w // self.patch_size))

    def empty_images(self, max_num_patches: int | None = None) -> NaFlexImages:
        """A batch of zero images (what a batch of only unusable samples carries)."""
        n = self.max_num_patches if max_num_patches is None else int(max_num_patches)
        dim = self.patch_size * self.patch_size * 3
        return NaFlexImages(torch.zeros(0, n, dim), torch.zeros(0, n, dtype=torch.bool), torch.zeros(0, 2, dtype=torch.long))

    @classmethod
    def from_data_config(cls, data_config: DataConfig, train: bool = False, **augment: Any) -> NaFlexPreprocess:
        """The preprocessing a NaFlex tower's ``data_config`` describes (its ``extra["naflex"]``); ``train`` and
        ``augment`` (``scale``, ``ratio``, ``color_jitter``, ...) as in the constructor."""
        naflex = data_config.extra["naflex"]
        return cls(naflex["patch_size"], naflex["max_num_patches"], data_config.mean, data_config.std,
                   data_config.interpolation, train=train, **augment)

    def __repr__(self) -> str:
        kind = f"train, scale={self.scale}" if self.train else "eval"
        return (
            f"{type(self).__name__}(patch_size={self.patch_size}, max_num_patches={self.max_num_patches}, "
            f"{kind}, interpolation={self.interpolation.value})"
        )


def collate_images(samples: Sequence[Any], pad_to: int | None = None) -> torch.Tensor | NaFlexImages:
    """One batch from preprocessed images: tensors are stacked; :class:`NaFlexSample` s are padded to the
    longest (or to ``pad_to`` patches) into :class:`NaFlexImages`.

    Raises:
        ValueError: an empty list, a mix of kinds, or ``pad_to`` below the longest sample.
    """
    if not samples:
        raise ValueError("collate_images needs at least one sample")
    if all(isinstance(s, torch.Tensor) for s in samples):
        return torch.stack(list(samples))
    if not all(isinstance(s, NaFlexSample) for s in samples):
        kinds = sorted({type(s).__name__ for s in samples})
        raise ValueError(f"collate_images takes image tensors or NaFlexSample s, not a mix: got {kinds}")
    longest = max(s.patches.shape[0] for s in samples)
    n = pad_to or longest
    if n < longest:
        raise ValueError(f"pad_to={pad_to} is below the longest sample ({longest} patches)")
    dim = samples[0].patches.shape[1]
    patches = samples[0].patches.new_zeros(len(samples), n, dim)
    mask = torch.zeros(len(samples), n, dtype=torch.bool)
    for i, s in enumerate(samples):
        patches[i, : s.patches.shape[0]] = s.patches
        mask[i, : s.patches.shape[0]] = True
    grid = torch.tensor([s.grid for s in samples], dtype=torch.long)
    return NaFlexImages(patches, mask, grid)
