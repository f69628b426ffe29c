"""The roads between the parts, taken as a user takes them: a sigmoid loss on any model, the FSDP recipe,
export to Hugging Face, user-registered towers from the command line, a frozen tower from a training
checkpoint, Hugging Face text towers in training."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import mmclip
from mmclip.cli.train import build_task, build_trainer, compose, train
from mmclip.tasks import ContrastiveTask
from tests.unit.tasks.fakes import FakeDataModule

REPO = Path(__file__).resolve().parents[2]
SHAPES_TINY = [  # the demo recipe at a size that trains in seconds
    "experiment=shapes_tiny", "report=false", "callbacks=none", "logger=none", "trainer.enable_model_summary=false",
    "data.n_train=256", "data.n_val=16", "data.n_test=16", "data.batch_size=32", "data.num_workers=0",
    "image_tower.image_size=32", "text_tower.width=32", "text_tower.layers=1",
]


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "mmclip.cli.main", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=600)


# ---- any loss on any model -------------------------------------------------------------------------------
def test_siglip_on_a_model_without_bias_in_code_adds_one_and_learns():
    task = ContrastiveTask(model="tiny-vit", loss={"name": "siglip"}, optimizer={"lr": 1e-3},
                                        scheduler={"name": None})
    assert task.model.logit_bias is not None  # added as the SigLIP paper initialises it
    assert task.model.logit_bias.item() == -10.0 and task.model.logit_scale.item() == pytest.approx(math.log(10))
    assert task.model.config["init_logit_bias"] == -10.0  # the checkpoint's spec has it too
    data = FakeDataModule(n=16, batch_size=16)
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = task.loss(task.model(batch.images, batch.input_ids))["loss"].item()
    trainer = pl.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    with torch.no_grad():
        after = task.loss(task.model(batch.images, batch.input_ids))["loss"].item()
    assert math.isfinite(after) and after < 0.5 * before, (before, after)


def test_siglip_from_a_pretrained_clip_keeps_the_added_bias(tmp_path):
    clip = mmclip.create_model("tiny-vit")
    clip.save_pretrained(tmp_path / "clip")
    task = ContrastiveTask(model=str(tmp_path / "clip"), loss={"name": "siglip"})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=FakeDataModule(n=8, batch_size=8))  # loads the CLIP weights (no bias)
    assert task.model.logit_bias is not None and trainer.global_step == 1


def test_siglip_through_the_cli_trains_and_the_loss_falls(tmp_path):
    run = _cli(["train", *SHAPES_TINY, "loss=siglip", "trainer.max_steps=40", "trainer.log_every_n_steps=1",
                f"run_dir={tmp_path}", "logger=default"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    import csv

    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) >= 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


# ---- compile and EMA through the CLI -----------------------------------------------------------------------
def test_compiled_training_with_ema_through_the_cli_writes_a_checkpoint_of_the_average(tmp_path):
    run = _cli(["train", *SHAPES_TINY, "trainer.max_steps=4", "task.compile=true", "task.text_pad_multiple=8",
                "task.ema={decay: 0.5}", "callbacks=basic", f"run_dir={tmp_path}"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (last,) = tmp_path.rglob("last.ckpt")
    state = torch.load(last, weights_only=True)["state_dict"]
    assert int(state["ema.n_averaged"]) == 4
    model = mmclip.create_model(str(last))  # the checkpoint as a model source gives the EMA weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"ema.module.{key}"]), key


# ---- FSDP ------------------------------------------------------------------------------------------------
def test_fsdp_recipe_instantiates_its_strategy():
    import timm.models.vision_transformer
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from mmclip.layers.transformer import TransformerBlock

    cfg = compose("train", ["trainer=fsdp"])
    kwargs = instantiate(cfg.trainer, _convert_="all")
    strategy = kwargs["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]  # one wrap unit per block of every tower mmclip builds
    assert {TransformerBlock, timm.models.vision_transformer.Block} <= set(policy._module_classes)
    assert strategy._state_dict_type == "sharded"  # each rank writes its shard
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA GPUs"):
            build_trainer(cfg)


def test_ddp_recipe_instantiates_buckets_as_gradient_views():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    strategy = instantiate(compose("train", ["trainer=ddp"]).trainer, _convert_="all")["strategy"]
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {"gradient_as_bucket_view": True, "static_graph": False}


def test_fsdp_on_a_cpu_machine_stops_with_a_clear_message(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the FSDP step itself runs in the GPU suite")
    run = _cli(["train", "trainer=fsdp", f"run_dir={tmp_path}"], tmp_path)
    assert run.returncode != 0
    assert "trainer=fsdp shards the model over CUDA GPUs" in run.stderr, run.stderr[-2000:]


# ---- export to Hugging Face ------------------------------------------------------------------------------
def test_export_hf_gives_the_same_ids_and_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.conftest import randomize_

    model = randomize_(mmclip.create_model("tiny-vit"), seed=4).eval()
    tokenizer = mmclip.get_tokenizer("tiny-vit")
    mmclip.export_hf(model, tmp_path)
    processor = transformers.CLIPProcessor.from_pretrained(str(tmp_path))
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
    texts = ["a photo of a dog", "Two CATS, sleeping!", "x " * 100]
    ids = processor(text=texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer(texts))  # not [0, 2, 2, 2, ...]
    from PIL import Image

    image = Image.new("RGB", (40, 36), (10, 200, 30))
    pixels = processor(images=[image], return_tensors="pt").pixel_values
    _, _, pre = mmclip.create_model_and_transforms("tiny-vit")
    torch.testing.assert_close(pixels[0], pre(image), atol=2e-2, rtol=0)  # HF resizes in uint8 PIL
    norm = torch.nn.functional.normalize
    feats = lambda out: out.pooler_output if hasattr(out, "pooler_output") else out  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(norm(feats(hf.get_text_features(input_ids=ids)), dim=-1),
                                   model.encode_text(ids, normalize=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(norm(feats(hf.get_image_features(pixel_values=pixels)), dim=-1),
                                   model.encode_image(pixels, normalize=True), atol=1e-5, rtol=0)


# ---- user code from the command line ---------------------------------------------------------------------
USER_MODULE = '''
import torch
from torch import nn

import mmclip
from mmclip.outputs import TowerOutput


@mmclip.IMAGE_TOWERS.register("user_pixels")
class UserPixels(nn.Module):
    """A user's own image tower: mean colour per image through a linear layer."""

    def __init__(self, width: int = 16, image_size: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(3, width)
        self.output_dim = width
        self.data_config = mmclip.towers.base.DataConfig(image_size=(image_size, image_size))

    def forward(self, x):
        return TowerOutput(pooled=self.proj(x.mean(dim=(2, 3))), tokens=None, mask=None)
'''


def test_a_user_registered_tower_trains_from_the_cli(tmp_path):
    (tmp_path / "my_towers.py").write_text(USER_MODULE)
    tiny = [a for a in SHAPES_TINY if not a.startswith(("experiment=", "image_tower."))]
    run = _cli(["train", *tiny, "imports=[my_towers]", "model=custom", "text_tower=clip_text_tiny",
                "model.kwargs.embed_dim=16", "+image_tower.name=user_pixels", "trainer.max_steps=3",
                "report=false", f"run_dir={tmp_path / 'run'}"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "UserPixels" in run.stderr + run.stdout
    bad = _cli(["train", *SHAPES_TINY, "imports=[not_there]", f"run_dir={tmp_path / 'bad'}"], tmp_path)
    assert bad.returncode != 0 and "imports names 'not_there'" in bad.stderr


# ---- a frozen tower from a training checkpoint (the README's road) -------------------------------------
def test_featurize_from_a_contrastive_training_checkpoint(tmp_path):
    train(compose("train", [*SHAPES_TINY, "trainer.max_steps=2", f"run_dir={tmp_path / 'clip'}",
                            "callbacks=default", "~callbacks.retrieval", "~callbacks.zeroshot", "~callbacks.progress",
                            "~callbacks.summary"]))
    ckpt = tmp_path / "clip" / "checkpoints" / "last.ckpt"
    cfg = compose("featurize", ["experiment=featurize_count", f"task.pretrained={ckpt}", "trainer.max_steps=2",
                                f"run_dir={tmp_path / 'feat'}", "report=false", "data.n_train=64", "data.n_val=8",
                                "data.n_test=8", "data.num_workers=0", "data.batch_size=16", "callbacks=none",
                                "logger=none"])
    task = build_task(cfg)
    clip = mmclip.create_model(str(ckpt))
    for key, value in clip.image_tower.state_dict().items():
        assert torch.equal(task.featurizer.tower.state_dict()[key], value), key
    train(cfg)


# ---- Hugging Face text towers ----------------------------------------------------------------------------
def test_hf_text_tower_from_a_directory_trains_in_train_mode_and_fits_its_positions(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=49408, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(str(tmp_path / "bert"))
    tower = mmclip.TEXT_TOWERS.build({"name": "hf", "model_name_or_path": str(tmp_path / "bert")})
    assert tower.training and all(m.training for m in tower.modules())  # dropout on, as it trains
    assert tower.context_length == 64
    spec = {"image_tower": {"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
            "text_tower": {"name": "hf", "model_name_or_path": str(tmp_path / "bert")}, "embed_dim": 16}
    task = ContrastiveTask(model=spec, tokenizer="clip")
    ids = task.tokenizer(["a caption " * 50])
    assert ids.shape == (1, 64)  # min(CLIP's 77, BERT's 64 positions), not a cryptic size error


# ---- skips by reason, from the data to the logs and the report -----------------------------------------
def test_skip_counts_by_reason_reach_the_training_logs_and_the_report(tmp_path):
    import csv as csvlib
    import json

    from mmclip.data.synthetic import SyntheticShapes
    from mmclip.data.writers import write_csv_files

    train_csv = write_csv_files(SyntheticShapes("train", 120, image_size=32), tmp_path / "data", "train")
    with open(train_csv, "a", encoding="utf-8") as f:
        f.write("train/missing.png,a red circle,0\n")  # missing_file
        f.write("train/extra.png,a caption,0,an extra field\n")  # malformed_row
        f.write("train/nothing.png\n")  # malformed_row
    (tmp_path / "data" / "train" / "empty.png").write_bytes(b"")
    with open(train_csv, "a", encoding="utf-8") as f:
        f.write("train/empty.png,an empty file,0\n")  # empty_file
    val_csv = write_csv_files(SyntheticShapes("val", 16, image_size=32), tmp_path / "data", "val")
    test_csv = write_csv_files(SyntheticShapes("test", 30, image_size=32), tmp_path / "data", "test")
    run = tmp_path / "run"
    model = ["model=custom", "image_tower=resnet_tiny", "image_tower.image_size=32", "text_tower=clip_text_tiny",
             "text_tower.width=32", "text_tower.layers=1", "model.kwargs.embed_dim=32"]
    train(compose("train", [*model, "data=csv", f"data.train_file={train_csv}", f"data.val_file={val_csv}",
                            f"data.test_file={test_csv}", "data.batch_size=32",
                            "data.num_workers=0", "data.max_skip_fraction=0.5", "trainer.max_steps=4",
                            "trainer.log_every_n_steps=1", "logger=default", "report=true", f"run_dir={run}",
                            "callbacks=none"]))
    rows = list(csvlib.DictReader(open(next(run.rglob("metrics.csv")))))
    logged = {k for r in rows for k, v in r.items() if v and k.startswith("data/")}
    assert {"data/skipped/missing_file", "data/skipped/malformed_row", "data/skipped/empty_file"} <= logged, logged
    report = json.loads((run / "report" / "metrics.json").read_text())["data"]
    assert report["data/skipped/malformed_row"] == 2 and report["data/skipped/missing_file"] == 1
    assert "malformed_row: 2" in (run / "report" / "summary.md").read_text()
