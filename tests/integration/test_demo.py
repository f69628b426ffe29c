"""The embedded demo learns: `shapes_tiny` as `make demo` runs it reaches its thresholds on held-out data."""

from __future__ import annotations

import json

import pytest

from mmclip.cli.train import compose, train


@pytest.mark.slow
def test_demo_reaches_its_thresholds(tmp_path):
    cfg = compose("train", ["experiment=shapes_tiny", f"run_dir={tmp_path}"])
    thresholds = dict(cfg.thresholds)  # the demo recipe's own targets
    assert thresholds == {"retrieval/t2i_R@1": 0.5, "zeroshot/held_out_top1": 0.8}
    results = train(cfg)
    report = tmp_path / "report"
    for name in ("metrics.json", "curves.png", "similarity_heatmap.png", "retrieval_grid.png", "summary.md"):
        assert (report / name).is_file(), name
    saved = json.loads((report / "metrics.json").read_text())
    for key, target in thresholds.items():
        assert results[key] >= target, (key, results[key], target)
        assert saved["metrics"][key] == results[key]
    assert saved["passed"] is True
    # far above chance (1 / 200 images for retrieval, 1 / 30 classes for zero-shot), on every class too
    assert results["zeroshot/top1"] >= 0.8 and results["zeroshot/top5"] >= 0.95
    print({k: round(results[k], 3) for k in (*thresholds, "zeroshot/top1", "zeroshot/top5")})
