"""Image transforms built from an image tower's ``DataConfig``.

Evaluation: resize + crop as ``data_config.resize_mode`` says ("shortest": shorter side to the target,
bicubic, then centre crop, resizing only the kept box when the image is far from square, so the work is
bounded by the output size; "squash": straight to the target size, as SigLIP; "longest": longer side to the
target, then centre pad), convert to RGB, scale to [0, 1], normalise. It is tensor-exact with open_clip's
``image_transform(..., is_train=False)`` (same PIL operations in the same order, same float32 arithmetic).

Training: RandomResizedCrop (area ``scale`` (0.9, 1.0) and aspect ``ratio`` (3/4, 4/3) by default, the
torchvision sampling algorithm), optional colour jitter and random grayscale, RGB, normalise. There is no
horizontal flip: captions say "left" and "right". Randomness comes from an explicit ``random.Random`` so
the data pipeline can seed every sample from (seed, epoch, sample index) and resume bit-identically.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from mmclip.data.quality import DEFAULT_MAX_PIXELS
from mmclip.towers.base import DataConfig

if TYPE_CHECKING:
    from mmclip.data.naflex import NaFlexPreprocess

__all__ = ["ImageTransform", "image_transform", "random_resized_crop_params"]

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESIZE_MODES = ("shortest", "squash", "longest")
_FALLBACK_RNG = random.Random()
_DIRECT_FACTOR = 16
"""Evaluation resizes a whole image when the resized image has at most this many times the output's pixels
(every ordinary aspect ratio, exactly as open_clip); beyond, only the centre-crop box is resized."""


def _guard(width: int, height: int) -> None:
    """The hard ceiling on intermediate images (the decoder's ``max_pixels`` default)."""
    if width * height > DEFAULT_MAX_PIXELS:
        raise ValueError(f"an intermediate image of {width}x{height} pixels exceeds {DEFAULT_MAX_PIXELS}")


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """Crop box ``(top, left, height, width)`` with torchvision's RandomResizedCrop algorithm.

    Ten tries at a box of ``scale`` times the area and log-uniform aspect ``ratio`` that fits; otherwise the
    largest centred box within ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageTransform:
    """``PIL.Image -> FloatTensor (3, H, W)``, normalised for an image tower (see the module docstring).

    Call it as ``transform(img)`` or ``transform(img, rng)``; training transforms draw their randomness
    from ``rng`` (a ``random.Random``), evaluation transforms ignore it.

    Args:
        size: output ``(height, width)``.
        mean: per-channel mean.
        std: per-channel std.
        interpolation: resize filter name ("bicubic", "bilinear", ...).
        resize_mode: "shortest", "squash" or "longest" (evaluation only).
        train: random resized crop + augmentation instead of the deterministic resize.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        color_jitter: ``(brightness, contrast, saturation, hue)`` strengths, one float for the first three,
            or ``None`` for no jitter.
        color_jitter_p: probability of jittering a sample.
        grayscale_p: probability of turning a sample gray (3 equal channels).
        fill: pad colour of "longest" mode.
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        train: bool = False,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float | Sequence[float] | None = None,
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.0,
        fill: int = 0,
    ):
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")
        if not (0 < scale[0] <= scale[1] <= 1.0 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(
                f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}"
            )
        self.size = (int(size[0]), int(size[1]))
        self.resample = _RESAMPLE[interpolation]
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.train = train
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        if isinstance(color_jitter, (int, float)):
            color_jitter = (float(color_jitter),) * 3 + (0.0,)
        if color_jitter is not None and len(color_jitter) != 4:
            raise ValueError("color_jitter must be a float or (brightness, contrast, saturation, hue)")
        self.color_jitter = None if color_jitter is None else tuple(float(c) for c in color_jitter)
        self.color_jitter_p = float(color_jitter_p)
        self.grayscale_p = float(grayscale_p)
        self.fill = fill
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {self.mean}, {self.std}")
        # Every uint8 value's normalised float, computed with torchvision's ToTensor + Normalize arithmetic
        # (x / 255, then (x - mean) / std in float32): a table lookup gives the same bits, without torch's
        # intra-op threads (slow on a busy machine) on small tensors.
        values = (
            torch.arange(256, dtype=torch.uint8).expand(3, 1, 256).to(torch.float32).div(255)
        )  # (3, 1, 256)
        mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self._lut = values.sub(mean_t).div(std_t).view(3, 256).numpy()  # (3, 256)

    def __repr__(self) -> str:
        kind = f"train, scale={self.scale}" if self.train else f"eval, resize_mode={self.resize_mode!r}"
        return f"ImageTransform(size={self.size}, {kind}, interpolation={self.interpolation!r})"

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if self.train:
            img = self._random_resized_crop(img, rng or _FALLBACK_RNG)
            img = img if img.mode == "RGB" else img.convert("RGB")
            img = self._augment(img, rng or _FALLBACK_RNG)
        else:
            img = self._resize_crop(img)
            img = img if img.mode == "RGB" else img.convert("RGB")
        return self.to_tensor(img)

    def empty_images(self) -> torch.Tensor:
        """A batch of zero images, ``(0, 3, H, W)`` (what a batch of only unusable samples carries)."""
        return torch.zeros(0, 3, *self.size)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> normalised ``(3, H, W)`` float32, bit-identical to torchvision's ToTensor + Normalize."""
        arr = np.asarray(img)  # (H, W, 3) uint8
        out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)  # (3, H, W)
        for c in range(3):
            np.take(self._lut[c], arr[..., c], out=out[c])
        return torch.from_numpy(out)

    def _random_resized_crop(self, img: Image.Image, rng: random.Random) -> Image.Image:
        top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, rng)
        out_h, out_w = self.size
        _guard(w, h)
        return img.crop((left, top, left + w, top + h)).resize((out_w, out_h), self.resample)

    def _augment(self, img: Image.Image, rng: random.Random) -> Image.Image:
        if self.color_jitter is not None and self.color_jitter_p > 0 and rng.random() < self.color_jitter_p:
            b, c, s, h = self.color_jitter
            ops = [0, 1, 2, 3]
            rng.shuffle(ops)
            for op in ops:
                if op == 0 and b > 0:
                    img = TF.adjust_brightness(img, rng.uniform(max(0.0, 1 - b), 1 + b))
                elif op == 1 and c > 0:
                    img = TF.adjust_contrast(img, rng.uniform(max(0.0, 1 - c), 1 + c))
                elif op == 2 and s > 0:
                    img = TF.adjust_saturation(img, rng.uniform(max(0.0, 1 - s), 1 + s))
                elif op == 3 and h > 0:
                    img = TF.adjust_hue(img, rng.uniform(-min(h, 0.5), min(h, 0.5)))
        if self.grayscale_p > 0 and rng.random() < self.grayscale_p:
            img = img.convert("L").convert("RGB")
        return img

    def _resize_crop(self, img: Image.Image) -> Image.Image:
        out_h, out_w = self.size
        w, h = img.size
        if self.resize_mode == "squash":
            return img.resize((out_w, out_h), self.resample)
        if self.resize_mode == "longest":
            ratio = max(h / out_h, w / out_w)
            img = img.resize((max(1, round(w / ratio)), max(1, round(h / ratio))), self.resample)
            return self._center_crop_or_pad(img)
        if out_h == out_w:  # torchvision Resize(n): shorter side to n, longer side truncated
            short, long = min(w, h), max(w, h)
            new_short, new_long = out_h, int(out_h * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:  # shorter relative side to its target, rounded (open_clip's ResizeKeepRatio)
            ratio = min(h / out_h, w / out_w)
            new_w, new_h = round(w / ratio), round(h / ratio)
        if new_w * new_h <= _DIRECT_FACTOR * out_h * out_w or new_w < out_w or new_h < out_h:
            _guard(new_w, new_h)
            return self._center_crop_or_pad(img.resize((new_w, new_h), self.resample))
        # A far-from-square image: resize only the box the centre crop keeps (same sampling positions as
        # resizing all of it, without a full-size intermediate: a 600000 x 2 strip would need gigabytes).
        top = int(round((new_h - out_h) / 2.0))
        left = int(round((new_w - out_w) / 2.0))
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        return img.resize((out_w, out_h), self.resample, box=box)

    def _center_crop_or_pad(self, img: Image.Image) -> Image.Image:
        out_h, out_w = self.size
        w, h = img.size
        if out_w > w or out_h > h:
            canvas = Image.new(img.mode, (max(w, out_w), max(h, out_h)), self.fill)
            canvas.paste(img, ((out_w - w) // 2 if out_w > w else 0, (out_h - h) // 2 if out_h > h else 0))
            img, (w, h) = canvas, canvas.size
            if (w, h) == (out_w, out_h):
                return img
        top = int(round((h - out_h) / 2.0))
        left = int(round((w - out_w) / 2.0))
        return img.crop((left, top, left + out_w, top + out_h))


def image_transform(
    data_config: DataConfig | None,
    train: bool,
    scale: tuple[float, float] = (0.9, 1.0),
    color_jitter: float | Sequence[float] | None = None,
    grayscale_p: float = 0.0,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    color_jitter_p: float = 0.8,
) -> ImageTransform | NaFlexPreprocess:
    """The transform an image tower expects (see the module docstring); for a NaFlex tower (its
    ``data_config.extra["naflex"]``) the :class:`mmclip.data.naflex.NaFlexPreprocess` it describes, which gives
    ``NaFlexSample`` s that :func:`mmclip.collate_images` batches.

    Args:
        data_config: the tower's ``DataConfig`` (``model.data_config``); ``None`` uses ``DataConfig()``.
        train: training (random resized crop + augmentation) or evaluation transform.
        scale: RandomResizedCrop area range (training).
        color_jitter: ``(brightness, contrast, saturation, hue)`` or one float; ``None`` disables it.
        grayscale_p: probability of a gray sample (training).
        ratio: RandomResizedCrop aspect-ratio range (training).
        color_jitter_p: probability of jittering a sample (training).

    Returns:
        A callable ``transform(img, rng=None) -> FloatTensor (3, H, W)`` (or ``-> NaFlexSample``).
    """
    cfg = data_config or DataConfig()
    if cfg.extra.get("naflex"):
        from mmclip.data.naflex import NaFlexPreprocess

        augment = dict(scale=scale, ratio=ratio, color_jitter=color_jitter, color_jitter_p=color_jitter_p,
                       grayscale_p=grayscale_p)
        return NaFlexPreprocess.from_data_config(cfg, train=train, **(augment if train else {}))
    size = cfg.image_size if isinstance(cfg.image_size, Sequence) else (cfg.image_size, cfg.image_size)
    return ImageTransform(
        size=(int(size[0]), int(size[1])),
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
        resize_mode=cfg.resize_mode,
        train=train,
        scale=scale,
        ratio=ratio,
        color_jitter=color_jitter,
        color_jitter_p=color_jitter_p,
        grayscale_p=grayscale_p,
    )
