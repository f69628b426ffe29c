"""The featurize root recipe and its experiments, and the lit_cached experiment: they compose, build their
task with hydra, train a few steps through ``train(cfg)``, report, and their checkpoints reload."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from mmclip.cli.train import compose, train
from mmclip.data.synthetic import SyntheticShapes
from mmclip.embedding.store import write_embeddings
from mmclip.tasks.featurizer import FeaturizerTask

TINY_TOWER = ["image_tower.width=32", "image_tower.layers=1", "image_tower.heads=2"]
TINY_DATA = ["data.n_train=32", "data.n_test=16", "data.batch_size=8", "data.num_workers=0"]


@pytest.mark.parametrize(
    "experiment,features,head",
    [("featurize_count", "tokens", "classify"), ("featurize_score", "pooled", "regress")],
)
def test_featurize_experiments_compose_and_build(experiment, features, head):
    cfg = compose("featurize", [f"experiment={experiment}"])
    assert cfg.name == experiment and cfg.data.scene_label == "count" and cfg.callbacks.keys() >= {"progress"}
    task = instantiate(cfg.task, _convert_="all")
    assert isinstance(task, FeaturizerTask)
    assert task.hparams.features == features and task.hparams.head == head
    assert task.hparams.image_tower == {
        "name": "clip_vit",
        "image_size": 64,
        "patch_size": 8,
        "width": 128,
        "layers": 4,
        "heads": 4,
    }
    assert (task.resampler is not None) == (experiment == "featurize_count")
    assert task.data_config.image_size == (64, 64) and isinstance(task.hparams.optimizer, dict)


@pytest.mark.parametrize("experiment", ["featurize_count", "featurize_score"])
def test_featurize_experiments_train_report_and_reload(experiment, tmp_path):
    cfg = compose(
        "featurize",
        [
            f"experiment={experiment}",
            f"run_dir={tmp_path}",
            "logger=none",
            "trainer.max_steps=2",
            "scheduler.warmup_steps=1",
            *TINY_TOWER,
            *TINY_DATA,
        ],
    )
    results = train(cfg)
    assert math.isfinite(results["train/loss"])
    key = "test/accuracy" if experiment == "featurize_count" else "test/r2"
    assert key in results and (tmp_path / "report" / "metrics.json").is_file()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    task = FeaturizerTask.load_from_checkpoint(ckpt, weights_only=True)
    images = torch.randn(2, 3, 64, 64)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    for k, v in task.head.state_dict().items():
        assert torch.equal(v, head[k]), k
    assert task.eval()(images).shape[0] == 2


def test_lit_cached_experiment_trains_on_a_store(tmp_path):
    dim = 16
    for split, n in (("train", 24), ("val", 8)):
        shapes = SyntheticShapes(split, n, image_size=16)
        raws = [shapes.get(i) for i in range(n)]
        emb = np.random.default_rng(0).standard_normal((n, dim))
        write_embeddings(
            tmp_path / split, emb, [r.key for r in raws], captions=[r.captions for r in raws], shard_size=10
        )
    full = compose("train", ["experiment=lit_cached", "data.train_store=x"])
    assert full.model.kwargs.embed_dim == full.image_tower.dim and full.model.kwargs.image_proj == "none"
    cfg = compose(
        "train",
        [
            "experiment=lit_cached",
            f"run_dir={tmp_path / 'run'}",
            "logger=none",
            f"data.train_store={tmp_path / 'train'}",
            f"data.val_store={tmp_path / 'val'}",
            "data.batch_size=8",
            "data.num_workers=0",
            f"image_tower.dim={dim}",
            "text_tower.width=32",
            "text_tower.layers=1",
            "text_tower.heads=2",
            "trainer.max_steps=3",
            "scheduler.warmup_steps=1",
        ],
    )
    results = train(cfg)
    assert math.isfinite(results["train/loss"])
    assert 0.0 <= results["val/retrieval/t2i_R@1"] <= 1.0  # the RetrievalEval callback ran on the val store
