"""mmclip's data layer: transforms, tolerant decoding, resumable loaders, data modules, synthetic data.

The data modules (and everything that imports Lightning or ``datasets``) load on first use, so importing
``mmclip.data.batch`` or the transforms stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmclip.data.batch import ImageTextBatch
from mmclip.data.collate import ProcessedSample, RawSample, SampleProcessor, collate, sample_rng, sample_seed
from mmclip.data.quality import (
    DEFAULT_MAX_PIXELS,
    SKIP_REASONS,
    DataQualityError,
    SkipCounter,
    SkipSample,
    SkipStats,
    decode_caption,
    decode_captions,
    decode_image,
    to_rgb,
)
from mmclip.data.transforms import ImageTransform, image_transform, random_resized_crop_params

_LAZY = {
    "ImageTextDataModule": "mmclip.data.base",
    "MapLoader": "mmclip.data.loader",
    "ResumableLoader": "mmclip.data.loader",
    "StreamLoader": "mmclip.data.stream",
    "SyntheticDataModule": "mmclip.data.synthetic_module",
    "SyntheticShapes": "mmclip.data.synthetic",
    "WebDatasetDataModule": "mmclip.data.wds",
    "ShardSource": "mmclip.data.wds",
    "HFDataModule": "mmclip.data.hf",
    "CsvDataModule": "mmclip.data.csv_data",
    "CsvSource": "mmclip.data.csv_data",
    "write_shards": "mmclip.data.writers",
    "write_hf_dataset": "mmclip.data.writers",
    "write_csv_files": "mmclip.data.writers",
}

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SKIP_REASONS",
    "DataQualityError",
    "ImageTextBatch",
    "ImageTransform",
    "ProcessedSample",
    "RawSample",
    "SampleProcessor",
    "SkipCounter",
    "SkipSample",
    "SkipStats",
    "collate",
    "decode_caption",
    "decode_captions",
    "decode_image",
    "image_transform",
    "random_resized_crop_params",
    "sample_rng",
    "sample_seed",
    "to_rgb",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmclip.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
