"""The embedded demo learns: `shapes_tiny` as `make demo` runs it reaches its thresholds on held-out data."""

from __future__ import annotations

import json

import pytest

from mmclip.cli.train import compose, train
from mmclip.report import DEMO_THRESHOLDS


@pytest.mark.slow
def test_demo_reaches_its_thresholds(tmp_path):
    results = train(compose("train", ["experiment=shapes_tiny", f"run_dir={tmp_path}"]))
    report = tmp_path / "report"
    for name in ("metrics.json", "curves.png", "similarity_heatmap.png", "retrieval_grid.png", "summary.md"):
        assert (report / name).is_file(), name
    saved = json.loads((report / "metrics.json").read_text())
    for key, target in DEMO_THRESHOLDS.items():
        assert results[key] >= target, (key, results[key], target)
        assert saved["metrics"][key] == results[key]
    assert saved["passed"] is True
    # far above chance: 1 / 200 images for retrieval, 1 / 30 classes (top-1) and 5 / 30 (top-5) for zero-shot
    assert results["retrieval/t2i_R@1"] > 50 / 200 and results["zeroshot/held_out_top1"] > 5 / 30
    assert results["zeroshot/top5"] >= 0.9
