"""A NaFlex model through every road a user takes: `mmclip train experiment=siglip2_naflex_tiny` as a command
(budget batches, the report), then its checkpoint into the `mmclip eval`, `mmclip embed` and `mmclip search`
entry points (their recipes and arguments; the commands' process start is tested elsewhere), each checked
against the model run on one image at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmclip
from mmclip.data import SyntheticDataModule
from mmclip.data.synthetic import SyntheticShapes

REPO = Path(__file__).resolve().parents[2]
TINY = [  # the recipe at a size that trains in seconds; images at most 16 patches of 8 px
    "experiment=siglip2_naflex_tiny", "logger=none", "callbacks=basic", "trainer.enable_model_summary=false",
    "data.n_train=64", "data.n_val=8", "data.n_test=12", "data.batch_size=16", "data.num_workers=0",
    "data.image_size=32", "image_tower.width=32", "image_tower.layers=1", "image_tower.pos_grid=4",
    "image_tower.max_num_patches=16", "text_tower.width=32", "text_tower.layers=1", "model.kwargs.embed_dim=32",
]
EVAL_DATA = ["data.n_train=0", "data.n_val=8", "data.n_test=12", "data.image_size=32", "data.num_workers=0",
             "data.aspect=varied", "data.classification_aspect=wide_tall"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mmclip.cli.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("naflex_run")
    run = _cli(["train", *TINY, "trainer.max_steps=3", "report=true", "data.naflex_batching=budget",
                f"run_dir={run_dir}"], run_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "naflex(patch_size=8, max_num_patches=16, batching='budget')" in run.stderr + run.stdout
    report = json.loads((run_dir / "report" / "metrics.json").read_text())["metrics"]
    assert 0 <= report["zeroshot/top1"] <= 1 and "retrieval/t2i_R@1" in report
    assert (run_dir / "report" / "retrieval_grid.png").stat().st_size > 0  # drawn from NaFlex patches
    return run_dir / "checkpoints" / "last.ckpt"


def test_eval_of_a_naflex_checkpoint_equals_one_image_per_batch(checkpoint, tmp_path):
    from mmclip.cli.evaluate import run_eval
    from mmclip.cli.train import compose
    from mmclip.evaluation import evaluate

    metrics = run_eval(compose("eval", [f"checkpoint={checkpoint}", f"run_dir={tmp_path}", "data.batch_size=5",
                                        *EVAL_DATA]))
    assert metrics == json.loads((tmp_path / "eval.json").read_text())["metrics"]
    model = mmclip.create_model(str(checkpoint))
    data = SyntheticDataModule(n_train=0, n_val=8, n_test=12, image_size=32, num_workers=0, eval_batch_size=1,
                               aspect="varied", classification_aspect="wide_tall")
    alone = evaluate(model, mmclip.get_tokenizer(str(checkpoint)), data, tasks=("zeroshot", "retrieval"))
    assert metrics.keys() == alone.keys() and metrics == pytest.approx(alone, abs=1e-6)


def test_embed_and_search_a_folder_of_wide_and_tall_images(checkpoint, tmp_path, capsys):
    from mmclip.cli.embed import main as embed_main
    from mmclip.cli.search import main as search_main
    from mmclip.embedding.store import EmbeddingStore

    images = tmp_path / "images"
    images.mkdir()
    shapes = SyntheticShapes("test", 6, image_size=32, aspect="varied")
    for i in range(6):
        shapes.get(i).image.save(images / f"{i}.png")
    assert len({Image.open(f).size for f in images.iterdir()}) > 1
    out = tmp_path / "store"
    assert embed_main([f"checkpoint={checkpoint}", "source.kind=images", f"source.path={images}", f"out={out}",
                       f"run_dir={tmp_path}", "num_workers=0", "progress=false", "batch_size=4"]) == 0

    model, _, preprocess = mmclip.create_model_and_transforms(str(checkpoint))
    files = sorted(images.glob("*.png"))
    with torch.no_grad():  # each image alone, at its own aspect ratio
        ref = torch.cat([model.eval().encode_image(mmclip.collate_images([preprocess(Image.open(f))]), normalize=True)
                         for f in files])
    stored = torch.from_numpy(EmbeddingStore(out).embeddings().astype(np.float32))
    torch.testing.assert_close(stored, ref.half().float(), atol=2e-3, rtol=0)  # the store keeps float16

    capsys.readouterr()
    assert search_main([str(out), "--image", str(files[1]), "-k", "1", "--json"]) == 0
    hit = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][0])
    assert hit["score"] == pytest.approx(float(stored[1] @ ref[1]), abs=2e-3)
    assert files[1].name in hit["id"]
