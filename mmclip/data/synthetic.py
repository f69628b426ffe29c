"""A synthetic image-caption data set of coloured shapes: no download, deterministic, fast to draw.

Each scene holds one to three shapes on a light, slightly noisy background. Every shape has a colour
(:data:`COLORS`), a kind (:data:`SHAPES`), a size (small / large) and a place on a 3 x 3 grid (with a little
jitter in position, size and colour). Captions come from varied templates and name every shape, often
with its size, its place ("in the top left corner") or its relation to another shape ("to the left of",
"above"): *"a small red circle to the left of a blue square"*.

Classes are the 30 colour-shape pairs (:data:`CLASSNAMES`, index ``colour * 5 + shape``). Six of them,
:data:`HELD_OUT_PAIRS` (20%; every colour and every shape still appears in training with other partners),
never appear in the ``train`` split, as any object of any scene, but do appear in every other split:
zero-shot classification of :data:`HELD_OUT_CLASSES` measures whether a model composes colour and shape.

Sample ``i`` of split ``s`` is a pure function of ``(seed, s, i)``: it renders identically every time, in
any process, without files. Classification samples (``kind="classification"``) show one shape and carry
its class label (classes dealt round-robin, so every class is equally frequent).

Aspect ratios (``aspect``): "square" (the default, every image above), "varied" (a third square, a third wide,
a third tall) or "wide_tall" (wide or tall only). A wide image is 2 or 3 times as wide as it is high (a tall one
the transpose); its shapes sit in a row of three cells ("on the left", "in the center", "on the right"; a tall
image's column: "at the top", "in the center", "at the bottom"), so a square centre crop cuts away most of the
shapes at the ends, and with them what their captions and labels say. Square scenes draw exactly as before.

Counting (``scene_label="count"``): scene samples carry ``label = number of shapes - 1``, a class id into
:data:`COUNT_CLASSNAMES` ("one shape", "two shapes", "three shapes"), as a target for models built on
frozen features (``mmclip.tasks.featurizer``). Scenes hold 1, 2 or 3 shapes with probabilities 0.40, 0.35
and 0.25, so always answering "one shape" is right 40% of the time (the majority-class chance level).

The Lightning data module that renders it on the fly is
:class:`mmclip.data.synthetic_module.SyntheticDataModule` (also importable from here). On disk:
:func:`write_webdataset`, :func:`write_hf`, :func:`write_csv`, :func:`write_all`, or
``python -m mmclip.data.synthetic --out DIR --n 20000``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from mmclip.data.collate import RawSample, sample_rng
from mmclip.data.writers import write_csv_files, write_hf_dataset, write_shards

__all__ = [
    "CLASSNAMES",
    "COLORS",
    "COUNT_CLASSNAMES",
    "COUNT_PROBS",
    "SCENE_LABELS",
    "HELD_OUT_CLASSES",
    "HELD_OUT_PAIRS",
    "SHAPES",
    "ASPECTS",
    "TEMPLATES",
    "Scene",
    "ShapeObject",
    "SyntheticShapes",
    "write_all",
    "write_csv",
    "write_hf",
    "write_webdataset",
]

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (50, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 40),
    "purple": (135, 60, 185),
    "orange": (240, 135, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
SIZES: dict[str, float] = {"small": 0.085, "large": 0.13}  # radius as a fraction of the image side
CLASSNAMES: list[str] = [f"{c} {s}" for c in COLORS for s in SHAPES]
COUNT_CLASSNAMES: list[str] = ["one shape", "two shapes", "three shapes"]
"""Class names of ``scene_label="count"`` labels (label = number of shapes - 1)."""
COUNT_PROBS: tuple[float, float, float] = (0.4, 0.35, 0.25)
"""Probability of a scene holding 1, 2 and 3 shapes."""
SCENE_LABELS: tuple[str, ...] = ("none", "count")
"""What the ``label`` of a scene sample is: "none" (the class of a lone shape, else -1) or "count"."""
ASPECTS: tuple[str, ...] = ("square", "varied", "wide_tall")
"""What ``aspect`` may be: every image square, a mix of square / wide / tall, or wide and tall only."""
_ELONGATIONS = (2.0, 3.0)  # long side / short side of wide and tall images
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "diamond"),
    ("blue", "cross"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "diamond"),
)
HELD_OUT_CLASSES: list[int] = sorted(CLASSNAMES.index(f"{c} {s}") for c, s in HELD_OUT_PAIRS)
TEMPLATES: list[str] = [
    "the {}.",
    "a picture of the {}.",
    "the small {}.",
    "the large {}.",
    "there is one {}.",
]
"""Zero-shot prompts in the captions' own style."""

_PLACES = {
    (1, 1): "in the center",
    (1, 0): "on the left",
    (1, 2): "on the right",
    (0, 1): "at the top",
    (2, 1): "at the bottom",
    (0, 0): "in the top left corner",
    (0, 2): "in the top right corner",
    (2, 0): "in the bottom left corner",
    (2, 2): "in the bottom right corner",
}
_NOISE = 8  # background / shape noise amplitude (+-)
_TEXTURES = 8
_texture_cache: dict[int, list[Image.Image]] = {}


@dataclass(frozen=True)
class ShapeObject:
    """One shape of a scene; ``cx`` and ``cy`` are fractions of the image's width and height, ``radius`` a
    fraction of its shorter side."""

    colour: str
    shape: str
    size: str
    row: int
    col: int
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]

    @property
    def label(self) -> int:
        """Class index of the colour-shape pair."""
        return CLASSNAMES.index(f"{self.colour} {self.shape}")

    @property
    def place(self) -> str:
        return _PLACES[(self.row, self.col)]


@dataclass(frozen=True)
class Scene:
    """A scene: its shapes, background colour, noise texture and ``aspect`` (width / height)."""

    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]
    texture: int
    aspect: float = 1.0

    def size(self, image_size: int) -> tuple[int, int]:
        """``(width, height)`` of the rendered image: the shorter side is ``image_size``."""
        if self.aspect >= 1:
            return round(image_size * self.aspect), image_size
        return image_size, round(image_size / self.aspect)


def _pairs(classes: str) -> list[tuple[str, str]]:
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    if classes == "all":
        return all_pairs
    if classes == "held_out":
        return list(HELD_OUT_PAIRS)
    if classes == "seen":
        return [p for p in all_pairs if p not in HELD_OUT_PAIRS]
    raise ValueError(f"classes must be 'all', 'seen' or 'held_out', got {classes!r}")


def _object(rng: Any, pair: tuple[str, str], cell: int) -> ShapeObject:
    colour, shape = pair
    row, col = divmod(cell, 3)
    size = rng.choice(("small", "large"))
    rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLORS[colour])
    return ShapeObject(
        colour=colour,
        shape=shape,
        size=size,
        row=row,
        col=col,
        cx=(col + 0.5) / 3 + rng.uniform(-0.025, 0.025),
        cy=(row + 0.5) / 3 + rng.uniform(-0.025, 0.025),
        radius=SIZES[size] * rng.uniform(0.92, 1.08),
        rgb=rgb,  # type: ignore[arg-type]
    )


def _line_object(rng: Any, pair: tuple[str, str], cell: int, aspect: float) -> ShapeObject:
    """A shape in cell ``cell`` of the row (wide, ``aspect`` > 1) or column (tall) of three cells."""
    colour, shape = pair
    size = rng.choice(("small", "large"))
    rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLORS[colour])
    along = (cell + 0.5) / 3 + rng.uniform(-0.02, 0.02)  # along the long side
    across = 0.5 + rng.uniform(-0.04, 0.04)
    wide = aspect > 1
    return ShapeObject(
        colour=colour,
        shape=shape,
        size=size,
        row=1 if wide else cell,
        col=cell if wide else 1,
        cx=along if wide else across,
        cy=across if wide else along,
        radius=2 * SIZES[size] * rng.uniform(0.92, 1.08),  # a cell is about the short side: twice a 3x3 cell
        rgb=rgb,  # type: ignore[arg-type]
    )


def sample_aspect(rng: Any, aspect: str) -> float:
    """Width / height of a scene under ``aspect`` (see :data:`ASPECTS`)."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    if aspect == "square" or (aspect == "varied" and rng.random() < 1 / 3):
        return 1.0
    elongation = rng.choice(_ELONGATIONS)
    return elongation if rng.random() < 0.5 else 1 / elongation


def sample_scene(
    rng: Any, pairs: list[tuple[str, str]], n_objects: int | None = None, aspect: float = 1.0
) -> Scene:
    """Draw a scene with ``n_objects`` (default: 1-3) distinct colour-shape ``pairs`` on distinct cells: of the
    3 x 3 grid for a square scene, of the row or column of three for a wide (``aspect`` > 1) or tall one."""
    n = n_objects or rng.choices((1, 2, 3), COUNT_PROBS)[0]
    cells = rng.sample(range(9 if aspect == 1 else 3), n)
    chosen = rng.sample(pairs, n)
    if aspect == 1:
        objects = tuple(_object(rng, p, c) for p, c in zip(chosen, cells, strict=True))
    else:
        objects = tuple(_line_object(rng, p, c, aspect) for p, c in zip(chosen, cells, strict=True))
    gray = rng.randint(200, 245)
    background = tuple(min(255, gray + rng.randint(-8, 8)) for _ in range(3))
    return Scene(objects=objects, background=background, texture=rng.randrange(_TEXTURES), aspect=aspect)  # type: ignore[arg-type]


def _textures(size: int) -> list[Image.Image]:
    if size not in _texture_cache:
        gen = np.random.default_rng(1234 + size)
        _texture_cache[size] = [
            Image.fromarray(gen.integers(0, 2 * _NOISE + 1, (size, size, 3), dtype=np.uint8), "RGB")
            for _ in range(_TEXTURES)
        ]
    return _texture_cache[size]


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image whose shorter side is ``image_size`` (square scenes: ``image_size``
    x ``image_size``)."""
    width, height = scene.size(image_size)
    s = min(width, height)
    img = Image.new("RGB", (width, height), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x, y, r = o.cx * width, o.cy * height, o.radius * s
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=o.rgb)
        elif o.shape == "square":
            h = 0.85 * r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=o.rgb)
        elif o.shape == "triangle":
            big = 1.15 * r
            draw.polygon(
                [(x, y - big), (x - 0.866 * big, y + big / 2), (x + 0.866 * big, y + big / 2)], fill=o.rgb
            )
        elif o.shape == "cross":
            t = 0.34 * r
            draw.rectangle((x - r, y - t, x + r, y + t), fill=o.rgb)
            draw.rectangle((x - t, y - r, x + t, y + r), fill=o.rgb)
        else:  # diamond
            big = 1.1 * r
            draw.polygon([(x, y - big), (x + 0.75 * big, y), (x, y + big), (x - 0.75 * big, y)], fill=o.rgb)
    texture = _textures(max(width, height))[scene.texture]
    if texture.size != (width, height):
        texture = texture.crop((0, 0, width, height))
    return ImageChops.add(img, texture, scale=1.0, offset=-_NOISE)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b`` (the dominant grid direction; horizontal on diagonals)."""
    dc, dr = b.col - a.col, b.row - a.row
    if abs(dc) >= abs(dr):
        return "to the left of" if dc > 0 else "to the right of"
    return "above" if dr > 0 else "below"


def _one(a: Any, da: str) -> list[str]:
    return [
        f"{_a(da)} {a.place}",
        f"there is {_a(da)} {a.place}",
        f"the {da} is {a.place}",
        f"{a.place}, {_a(da)}",
        f"a picture of {_a(da)} {a.place}",
        f"a single {da} {a.place}",
    ]


def _two(a: Any, b: Any, da: str, db: str) -> list[str]:
    rel = _relation(a, b)
    return [
        f"{_a(da)} {rel} {_a(db)}",
        f"the {da} is {rel} the {db}",
        f"there is {_a(da)} {rel} {_a(db)}",
        f"{_a(da)} {a.place} and {_a(db)} {b.place}",
        f"two shapes: {_a(da)} and {_a(db)}",
    ]


def _three(a: Any, b: Any, c: Any, da: str, db: str, dc: str) -> list[str]:
    rel = _relation(a, b)
    return [
        f"{_a(da)} {rel} {_a(db)}, and {_a(dc)} {c.place}",
        f"{_a(da)}, {_a(db)} and {_a(dc)}",
        f"three shapes: {_a(da)} {a.place}, {_a(db)} {b.place} and {_a(dc)} {c.place}",
        f"the {da} is {rel} the {db} and the {dc} is {c.place}",
        f"there are three shapes: {_a(da)}, {_a(db)} and {_a(dc)}",
    ]


_TEMPLATE_SETS: dict[int, Callable[..., list[str]]] = {1: _one, 2: _two, 3: _three}


def captions_for(scene: Scene, rng: Any, k: int = 5, shape_only: float = 0.0) -> list[str]:
    """``k`` captions of ``scene`` from distinct templates (repeating templates only when ``k`` is larger).

    With probability ``shape_only`` a caption leaves the colours out ("a small circle to the left of a
    square"): a caption a scene can only be told from its neighbours by through its shapes.
    """
    n = len(scene.objects)
    n_templates = len(_TEMPLATE_SETS[n](*scene.objects, *(o.shape for o in scene.objects)))
    picks = rng.sample(range(n_templates), min(k, n_templates))
    picks += [rng.randrange(n_templates) for _ in range(k - len(picks))]
    out = []
    for t in picks:
        objects = list(scene.objects)
        rng.shuffle(objects)
        descs = [
            f"{o.size} {o.colour} {o.shape}" if rng.random() < 0.75 else f"{o.colour} {o.shape}"
            for o in objects
        ]
        if shape_only and rng.random() < shape_only:
            descs = [d.replace(f"{o.colour} ", "") for d, o in zip(descs, objects, strict=True)]
        out.append(_TEMPLATE_SETS[n](*objects, *descs)[t])
    return out


class SyntheticShapes:
    """The synthetic data set as a map-style source: ``len``, ``get(i) -> RawSample``, ``scene(i)``.

    Args:
        split: split name; "train" never shows :data:`HELD_OUT_PAIRS`, any other split may.
        n: number of samples.
        image_size: rendered side in pixels.
        seed: data seed (scenes depend on ``(seed, split, index)`` only).
        captions_per_image: captions per scene.
        kind: "scenes" (1-3 shapes, captions) or "classification" (one shape, label, captions).
        classes: for "classification": "all", "seen" or "held_out" classes.
        scene_label: the ``label`` of "scenes" samples: "none" (the class of a lone shape, -1 for
            several) or "count" (number of shapes - 1, an index into :data:`COUNT_CLASSNAMES`).
        shape_only_captions: probability that a caption names the shapes without their colours (see
            :func:`captions_for`; 0 keeps every caption, and the random stream, as it was).
        aspect: "square", "varied" or "wide_tall" (see the module docstring); ``image_size`` is then the
            shorter side.
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 1000,
        image_size: int = 64,
        seed: int = 0,
        captions_per_image: int = 5,
        kind: str = "scenes",
        classes: str = "all",
        scene_label: str = "none",
        shape_only_captions: float = 0.0,
        aspect: str = "square",
    ):
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
        self.aspect = aspect
        if not 0.0 <= shape_only_captions <= 1.0:
            raise ValueError(f"shape_only_captions is a probability in [0, 1], got {shape_only_captions}")
        self.shape_only_captions = float(shape_only_captions)
        if kind not in ("scenes", "classification"):
            raise ValueError(f"kind must be 'scenes' or 'classification', got {kind!r}")
        if scene_label not in SCENE_LABELS:
            raise ValueError(f"scene_label must be one of {SCENE_LABELS}, got {scene_label!r}")
        if scene_label != "none" and kind != "scenes":
            raise ValueError(f"scene_label={scene_label!r} labels scenes; it needs kind='scenes'")
        self.scene_label = scene_label
        self.split, self.n, self.image_size, self.seed = split, int(n), int(image_size), seed
        self.captions_per_image, self.kind = captions_per_image, kind
        self.pairs = (
            [p for p in _pairs("all") if p not in HELD_OUT_PAIRS] if split == "train" else _pairs("all")
        )
        self.classes = _pairs(classes) if kind == "classification" else self.pairs
        if split == "train" and any(p in HELD_OUT_PAIRS for p in self.classes):
            raise ValueError("the train split never shows held-out pairs; use classes='seen' for it")

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        """The scene of sample ``index``."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        rng = sample_rng(self.seed, self.split, self.kind, index, "scene")
        aspect = sample_aspect(sample_rng(self.seed, self.split, self.kind, index, "aspect"), self.aspect)
        if self.kind == "classification":
            return sample_scene(rng, [self.classes[index % len(self.classes)]], n_objects=1, aspect=aspect)
        return sample_scene(rng, self.pairs, aspect=aspect)

    def key(self, index: int) -> str:
        return f"{self.split}-{'cls-' if self.kind == 'classification' else ''}{index:08d}"

    def get(self, index: int) -> RawSample:
        scene = self.scene(index)
        captions = captions_for(
            scene,
            sample_rng(self.seed, self.split, self.kind, index, "captions"),
            self.captions_per_image,
            self.shape_only_captions,
        )
        if self.scene_label == "count":
            label = len(scene.objects) - 1
        else:
            label = scene.objects[0].label if len(scene.objects) == 1 else -1
        return RawSample(self.key(index), render(scene, self.image_size), captions, label)

    def __getitem__(self, index: int) -> RawSample:
        return self.get(index)

    def __iter__(self) -> Iterator[RawSample]:
        return (self.get(i) for i in range(self.n))


def _splits(n: int, n_val: int | None, n_test: int | None) -> dict[str, int]:
    return {
        "train": n,
        "val": max(1, n // 10) if n_val is None else n_val,
        "test": max(1, n // 10) if n_test is None else n_test,
    }


def write_webdataset(
    out_dir: str | os.PathLike[str],
    split: str = "train",
    n: int = 1000,
    shard_size: int = 1000,
    **kwargs: Any,
) -> list[str]:
    """Write ``n`` samples of ``split`` as shards ``{split}-000000.tar...`` (+ ``sizes.json``) in ``out_dir``.

    ``kwargs``: :class:`SyntheticShapes` options, ``image_format`` ("png"/"jpg"), ``progress`` callback.
    """
    writer_kw = {k: kwargs.pop(k) for k in ("image_format", "progress") if k in kwargs}
    return write_shards(SyntheticShapes(split, n, **kwargs), out_dir, split, shard_size, **writer_kw)


def write_hf(
    out_dir: str | os.PathLike[str],
    split: str = "train",
    n: int = 1000,
    file_format: str = "arrow",
    **kwargs: Any,
) -> str:
    """Write ``n`` samples of ``split`` as a Hugging Face dataset (``save_to_disk`` or parquet) in ``out_dir``."""
    writer_kw = {k: kwargs.pop(k) for k in ("image_format", "progress") if k in kwargs}
    return write_hf_dataset(SyntheticShapes(split, n, **kwargs), out_dir, split, file_format, **writer_kw)


def write_csv(
    out_dir: str | os.PathLike[str], split: str = "train", n: int = 1000, sep: str = ",", **kwargs: Any
) -> str:
    """Write ``n`` samples of ``split`` as image files plus ``{split}.csv`` (``sep="\\t"``: ``.tsv``)."""
    writer_kw = {k: kwargs.pop(k) for k in ("image_format", "progress") if k in kwargs}
    return write_csv_files(SyntheticShapes(split, n, **kwargs), out_dir, split, sep, **writer_kw)


def write_all(
    out_dir: str | os.PathLike[str],
    n: int = 20000,
    n_val: int | None = None,
    n_test: int | None = None,
    formats: tuple[str, ...] = ("wds", "hf", "csv"),
    shard_size: int = 1000,
    progress: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Write train / val / test (``n``, default ``n // 10``, ``n // 10``) in every format under ``out_dir``:
    ``wds/``, ``hf/`` (``save_to_disk``) and ``csv/``. Returns ``{format: {split: path(s)}}``."""
    out: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        target = os.path.join(os.fspath(out_dir), fmt)
        for split, count in _splits(n, n_val, n_test).items():
            if fmt == "wds":
                path: Any = write_webdataset(target, split, count, shard_size, progress=progress, **kwargs)
            elif fmt == "hf":
                path = write_hf(target, split, count, progress=progress, **kwargs)
            elif fmt == "csv":
                path = write_csv(target, split, count, progress=progress, **kwargs)
            else:
                raise ValueError(f"formats must be among 'wds', 'hf', 'csv', got {fmt!r}")
            out.setdefault(fmt, {})[split] = path
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m mmclip.data.synthetic --out DIR --n 20000``: write the data set in every format."""
    parser = argparse.ArgumentParser(prog="python -m mmclip.data.synthetic", description=main.__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=20000, help="training samples")
    parser.add_argument("--n-val", type=int, default=None, help="validation samples (default n // 10)")
    parser.add_argument("--n-test", type=int, default=None, help="test samples (default n // 10)")
    parser.add_argument("--formats", default="wds,hf,csv", help="comma-separated subset of wds,hf,csv")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--image-format", default="png", choices=["png", "jpg", "webp"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    from rich.progress import Progress

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    total = sum(_splits(args.n, args.n_val, args.n_test).values()) * len(formats)
    with Progress() as bar:
        task = bar.add_task(f"writing {args.out}", total=total)
        paths = write_all(
            args.out,
            args.n,
            args.n_val,
            args.n_test,
            formats=formats,
            shard_size=args.shard_size,
            progress=lambda k: bar.advance(task, k),
            image_size=args.image_size,
            seed=args.seed,
            captions_per_image=args.captions_per_image,
            image_format=args.image_format,
        )
    for fmt, splits in paths.items():
        bar.console.print(
            f"{fmt}: "
            + ", ".join(
                f"{s} -> {p if isinstance(p, str) else os.path.dirname(p[0])}" for s, p in splits.items()
            )
        )


def __getattr__(name: str) -> Any:
    if (
        name == "SyntheticDataModule"
    ):  # lives in its own module so that the data set does not import Lightning
        from mmclip.data.synthetic_module import SyntheticDataModule

        return SyntheticDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
