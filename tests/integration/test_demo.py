"""The embedded demo learns: `shapes_tiny` as `make demo` runs it reaches its thresholds on held-out data."""

from __future__ import annotations

import json

import pytest
import torch

from mmclip.cli.train import compose, train


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`make demo`'s training, once per session: the demo test checks it, the vision-language test freezes its
    image tower."""
    run_dir = tmp_path_factory.mktemp("shapes_tiny")
    cfg = compose("train", ["experiment=shapes_tiny", f"run_dir={run_dir}"])
    return run_dir, cfg, train(cfg)


@pytest.mark.slow
def test_demo_reaches_its_thresholds(demo_run):
    tmp_path, cfg, results = demo_run
    thresholds = dict(cfg.thresholds)  # the demo recipe's own targets
    assert thresholds == {"retrieval/t2i_R@1": 0.5, "zeroshot/held_out_top1": 0.8}
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


@pytest.mark.slow
def test_vlm_shapes_on_the_demos_frozen_tower_reaches_its_thresholds(demo_run, tmp_path):
    """`mmclip train -cn vlm experiment=vlm_shapes` after `make demo`: exact match on held-out images, zero-shot
    and with two solved examples, and the frozen image tower bit-identical to the demo's."""
    from mmclip.models.factory import create_model

    demo_dir, _, _ = demo_run
    ckpt = demo_dir / "checkpoints" / "last.ckpt"
    cfg = compose("vlm", ["experiment=vlm_shapes", f"run_dir={tmp_path}", f"task.image_encoder={ckpt}", "logger=none"])
    assert dict(cfg.task.thresholds) == {"exact/colour/0shot": 0.9, "exact/shape/0shot": 0.9, "exact/count/0shot": 0.8}
    results = train(cfg)  # on_fit_end checks the frozen tower and language model against their fingerprints
    assert results["report_passed"] is True
    for kind, target in (("colour", 0.9), ("shape", 0.9), ("count", 0.8)):
        assert results[f"exact/{kind}/0shot"] >= target, (kind, results)
    assert results["exact/all/2shot"] >= results["exact/all/0shot"], results  # solved examples do not hurt
    from mmclip.tasks.vlm import VLMTask

    task = VLMTask.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    tower = create_model(str(ckpt)).image_tower
    for key, value in tower.state_dict().items():
        assert torch.equal(task.model.featurizer.tower.state_dict()[key], value), key
    print({k: round(v, 3) for k, v in results.items() if k.startswith("exact/")})
