"""Every model source into every entry point, each giving the embeddings of the source's reference
(transformers, open_clip or the original mmclip model) to 1e-5: ``create_model``, ``get_tokenizer``,
``create_model_and_transforms``, ``ContrastiveTask(model=...)`` (a fit), ``mmclip eval``, ``mmclip embed`` and
``mmclip search``. Hub sources are read offline from a hub cache the test lays out."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import mmclip
from mmclip.cli.train import compose
from tests.sources import CAPTIONS, HUB_CLIP, build_sources
from tests.unit.tasks.fakes import FakeDataModule

pytest.importorskip("open_clip")

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
KINDS = [
    "named_and_file",
    "spec_and_file",
    "mmclip_dir",
    "hf_dir",
    "hub_id",
    "openclip_dir",
    "hf_hub_openclip",
    "checkpoint",
    "instance",
]
IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def sources(hub_cache):
    import huggingface_hub.constants as hub

    old = hub.HF_HUB_CACHE
    hub.HF_HUB_CACHE = str(hub_cache / "hub")  # the cache the resolver reads (offline: conftest sets it)
    try:
        yield build_sources(hub_cache)
    finally:
        hub.HF_HUB_CACHE = old


def _assert_same(model, tokenizer, src) -> None:
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(IMAGES, normalize=True), src.embed_image(IMAGES), atol=TOL, rtol=0)
        torch.testing.assert_close(
            model.encode_text(tokenizer(CAPTIONS), normalize=True), src.embed_text(CAPTIONS), atol=TOL, rtol=0
        )


@pytest.mark.parametrize("kind", KINDS)
def test_create_model_and_tokenizer_match_the_reference(sources, kind):
    src = sources[kind]
    model = mmclip.create_model(src.source, pretrained=src.pretrained)
    tokenizer = mmclip.get_tokenizer(src.source)
    assert torch.equal(tokenizer(CAPTIONS), src.reference_ids(CAPTIONS))  # the reference's own ids
    _assert_same(model, tokenizer, src)
    model2, train_pre, pre = mmclip.create_model_and_transforms(src.source, pretrained=src.pretrained)
    from PIL import Image

    image = Image.new("RGB", (48, 40), (200, 30, 30))
    batch = torch.stack([pre(image), pre(image)])
    assert batch.shape == (2, 3, 32, 32) and train_pre(image).shape == (3, 32, 32)


@pytest.mark.parametrize("kind", ["hf_dir", "checkpoint"])
def test_task_without_a_model_takes_a_self_describing_pretrained_source(sources, kind):
    from mmclip.tasks import ContrastiveTask

    src = sources[kind]
    task = ContrastiveTask(model=None, pretrained=src.source, optimizer={"lr": 0.0, "weight_decay": 0.0})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=FakeDataModule(n=8, batch_size=8))
    _assert_same(task.model, task.tokenizer, src)


def test_unknown_sources_say_what_went_wrong(sources, tmp_path):
    with pytest.raises(FileNotFoundError, match="nobody/nothing"):
        mmclip.create_model("nobody/nothing")  # not in the offline cache: the repo is named
    with pytest.raises(KeyError, match="Did you mean 'ViT-B-32'"):
        mmclip.create_model("ViT-B-33")
    with pytest.raises(ValueError, match="does not say its architecture"):
        mmclip.create_model(sources["named_and_file"].pretrained)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        mmclip.create_model(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_contrastive_task_fits_from_every_source(sources, kind):
    from mmclip.tasks import ContrastiveTask

    src = sources[kind]
    source = copy.deepcopy(src.source) if kind == "instance" else src.source
    task = ContrastiveTask(
        model=source, pretrained=src.pretrained, optimizer={"lr": 0.0, "weight_decay": 0.0}
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=FakeDataModule(n=16, batch_size=8))
    assert trainer.global_step == 2
    _assert_same(task.model, task.tokenizer, src)  # weights loaded at fit start; lr 0 keeps them
    # the checkpoint rebuilds the task without the source (no hydra, no directory, no instance)
    path = Path(trainer.default_root_dir) / f"{kind}.ckpt"
    trainer.save_checkpoint(path)
    again = ContrastiveTask.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    _assert_same(again.model, again.tokenizer, src)
    path.unlink()


def test_instance_checkpoint_reloads_from_its_config_and_towers_from_modules_say_how(sources, tmp_path):
    from mmclip.tasks import ContrastiveTask

    src = sources["instance"]
    task = ContrastiveTask(model=copy.deepcopy(src.source))
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "spec.ckpt")
    again = ContrastiveTask.load_from_checkpoint(tmp_path / "spec.ckpt", weights_only=True)
    _assert_same(again.model, again.tokenizer, src)
    # towers passed as modules: no spec to rebuild from; the error says what to do
    tower = mmclip.IMAGE_TOWERS.build({"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2})
    loose = mmclip.DualEncoder(tower, {"name": "clip_text", "width": 64, "heads": 2, "layers": 1}, embed_dim=32)
    task = ContrastiveTask(model=loose)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "loose.ckpt")
    with pytest.raises(ValueError, match="load_from_checkpoint\\(path, model=the_same_model\\)"):
        ContrastiveTask.load_from_checkpoint(tmp_path / "loose.ckpt", weights_only=True)
    again = ContrastiveTask.load_from_checkpoint(tmp_path / "loose.ckpt", model=loose, weights_only=True)
    assert again.model is loose
    with pytest.raises(Exception, match="built in code"):
        mmclip.create_model(tmp_path / "loose.ckpt")


def _recipe_source(kind: str, src) -> list[str]:
    """The eval / embed overrides that name a source: `checkpoint=` for whole models, model.name + weights."""
    if kind in ("named_and_file",):
        return [f"model.name={src.source}", f"checkpoint={src.pretrained}"]
    return [f"checkpoint={src.source}"]


RECIPE_KINDS = ["named_and_file", "mmclip_dir", "hf_dir", "hub_id", "openclip_dir", "hf_hub_openclip", "checkpoint"]
DATA = ["data.n_train=0", "data.n_val=6", "data.n_test=30", "data.num_workers=0", "data.image_size=32"]


@pytest.mark.parametrize("kind", RECIPE_KINDS)
def test_eval_recipe_uses_the_source(sources, kind, tmp_path):
    from mmclip.cli.evaluate import run_eval
    from mmclip.data import SyntheticDataModule
    from mmclip.evaluation import evaluate

    src = sources[kind]
    got = run_eval(compose("eval", [*_recipe_source(kind, src), f"run_dir={tmp_path}", *DATA]))
    model = mmclip.create_model(src.source, pretrained=src.pretrained)
    _assert_same(model, mmclip.get_tokenizer(src.source), src)
    data = SyntheticDataModule(n_train=0, n_val=6, n_test=30, image_size=32, num_workers=0)
    assert got == pytest.approx(evaluate(model, mmclip.get_tokenizer(src.source), data, tasks=("zeroshot", "retrieval")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from mmclip.data.synthetic import SyntheticShapes

    root = tmp_path_factory.mktemp("images")
    shapes = SyntheticShapes("val", 5, image_size=40)
    for i in range(5):
        shapes.get(i).image.save(root / f"img{i}.png")
    return root


def _store_matches(out: Path, model, images: Path) -> None:
    from PIL import Image

    from mmclip.data.transforms import image_transform
    from mmclip.embedding.store import EmbeddingStore

    store = EmbeddingStore(out)
    stored = torch.from_numpy(store.embeddings().astype(np.float32))
    pre = image_transform(model.data_config, train=False)
    files = sorted(images.glob("*.png"))
    with torch.no_grad():
        ref = model.eval().encode_image(torch.stack([pre(Image.open(f)) for f in files]), normalize=True)
    assert stored.shape == ref.shape
    # the store keeps float16 by design: equal to the reference up to float16 rounding
    torch.testing.assert_close(stored, ref.half().float(), atol=TOL + 2**-11, rtol=0)


@pytest.mark.parametrize("kind", ["named_and_file", "mmclip_dir", "hf_dir", "openclip_dir", "checkpoint"])
def test_embed_and_search_use_the_source(sources, kind, images, tmp_path, capsys):
    from mmclip.cli.embed import embed
    from mmclip.cli.search import main as search_main

    src = sources[kind]
    out = tmp_path / "store"
    overrides = [*_recipe_source(kind, src), "source.kind=images", f"source.path={images}", f"out={out}",
                 f"run_dir={tmp_path}", "batch_size=2", "num_workers=0", "progress=false"]
    embed(compose("embed", overrides))
    model = mmclip.create_model(src.source, pretrained=src.pretrained)
    _store_matches(out, model, images)
    assert search_main([str(out), "--text", CAPTIONS[0], "-k", "2", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    text = src.embed_text([CAPTIONS[0]])[0].detach()
    from mmclip.embedding.store import EmbeddingStore

    scores = torch.from_numpy(EmbeddingStore(out).embeddings().astype(np.float32)) @ text
    assert [h["score"] for h in hits] == pytest.approx(scores.topk(2).values.tolist(), abs=1e-3)


def _cli(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mmclip.cli.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_eval_embed_search_from_a_hub_id_offline(sources, hub_cache, images, tmp_path):
    """The commands as a user runs them, on `openai/clip-vit-base-patch32` read from the local hub cache."""
    src = sources["hub_id"]
    run = _cli(["eval", f"model.name={HUB_CLIP}", f"run_dir={tmp_path / 'eval'}", *DATA], hub_cache / "hub", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    from mmclip.data import SyntheticDataModule
    from mmclip.evaluation import evaluate

    model = mmclip.create_model(HUB_CLIP)
    data = SyntheticDataModule(n_train=0, n_val=6, n_test=30, image_size=32, num_workers=0)
    assert metrics == pytest.approx(evaluate(model, mmclip.get_tokenizer(HUB_CLIP), data, tasks=("zeroshot", "retrieval")))
    out = tmp_path / "store"
    run = _cli(["embed", f"checkpoint={HUB_CLIP}", "source.kind=images", f"source.path={images}", f"out={out}",
                f"run_dir={tmp_path}", "num_workers=0", "progress=false"], hub_cache / "hub", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    _store_matches(out, model, images)
    run = _cli(["search", str(out), "--text", CAPTIONS[1], "-k", "1", "--json"], hub_cache / "hub", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    hit = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][0])
    from mmclip.embedding.store import EmbeddingStore

    with torch.no_grad():
        scores = torch.from_numpy(EmbeddingStore(out).embeddings().astype(np.float32)) @ src.embed_text([CAPTIONS[1]])[0]
    assert hit["score"] == pytest.approx(scores.max().item(), abs=1e-3)
