"""`mmclip caption`: JSON lines, one per readable image, in order; bad images counted, not fatal.

Reference: the captions the loaded task gives for the same files, prepared by hand with the tower's own
evaluation transform.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from mmclip.cli.caption import find_images, main
from mmclip.data import SyntheticDataModule
from mmclip.data.quality import decode_image
from mmclip.data.synthetic import SyntheticShapes
from mmclip.data.transforms import image_transform
from mmclip.tasks.captioning import CaptioningTask

REPO = Path(__file__).resolve().parents[2]
TOWER = {"name": "clip_vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
LM = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 48}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    task = CaptioningTask(
        image_encoder=TOWER,
        freeze_image=False,
        mapper={"kind": "mlp", "prefix_length": 3},
        lm=LM,
        tokenizer={"kind": "bpe", "vocab_size": 384, "num_scenes": 100},
        optimizer={"lr": 1e-3},
        scheduler={"name": None},
    )
    dm = SyntheticDataModule(n_train=16, n_val=0, n_test=0, image_size=32, batch_size=8, num_workers=0)
    dm.configure(data_config=task.data_config, tokenizer=task.tokenizer)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / "caption.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def images(tmp_path) -> dict[str, list[Path]]:
    """Five good images (three of them in a nested folder, one .jpg), one corrupt .png, one text file."""
    shapes = SyntheticShapes("test", 5, image_size=48)
    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    good = [folder / "a.png", folder / "b.jpg", folder / "nested" / "c.png", folder / "nested" / "d.png"]
    for i, path in enumerate(good):
        shapes.get(i).image.save(path)
    loose = tmp_path / "loose.png"
    shapes.get(4).image.save(loose)
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    return {"good": good, "loose": [loose], "bad": [bad], "folder": [folder]}


def _reference(checkpoint: Path, paths: list[Path], **kwargs) -> list[str]:
    task = CaptioningTask.load_from_checkpoint(checkpoint, weights_only=True).eval()
    transform = image_transform(task.data_config, train=False)
    batch = torch.stack([transform(decode_image(p)) for p in paths])
    return task.caption(batch, **kwargs)


def test_folder_search_is_recursive_sorted_and_keeps_given_files(images):
    found = find_images([*images["loose"], *images["folder"]])
    assert found == [*images["loose"], *sorted(images["good"] + images["bad"])]


def test_caption_cli_writes_one_json_line_per_readable_image(checkpoint, images, tmp_path, capsys, caplog):
    out = tmp_path / "captions.jsonl"
    args = [str(checkpoint), str(images["loose"][0]), str(images["folder"][0])]
    rc = main([*args, "--batch-size", "2", "--out", str(out), "--no-progress", "--max-length", "8"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    readable = [*images["loose"], *sorted(images["good"])]
    assert [Path(r["image"]) for r in rows] == readable
    assert [r["caption"] for r in rows] == _reference(checkpoint, readable, max_new_tokens=8)
    assert all(set(r) == {"image", "caption"} and isinstance(r["caption"], str) for r in rows)
    err = capsys.readouterr().err
    assert "captioned 5 image(s); 1 unreadable" in err
    assert "unreadable image" in caplog.text and "broken.png" in caplog.text  # logged (stderr in a real run)


def test_caption_cli_beam_to_stdout_in_a_subprocess(checkpoint, images):
    cmd = [
        sys.executable,
        "-m",
        "mmclip.cli.caption",
        str(checkpoint),
        *map(str, images["good"]),
        *map(str, images["bad"]),
        "--strategy",
        "beam",
        "--num-beams",
        "2",
        "--max-length",
        "6",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]  # stdout holds nothing but JSON lines
    assert [r["image"] for r in rows] == [str(p) for p in images["good"]]
    assert [r["caption"] for r in rows] == _reference(
        checkpoint, images["good"], strategy="beam", num_beams=2, max_new_tokens=6
    )
    assert "1 unreadable" in done.stderr and "broken.png" in done.stderr


def test_caption_cli_fails_when_nothing_is_readable(checkpoint, images, capsys):
    assert main([str(checkpoint), str(images["bad"][0]), "--no-progress"]) == 1
    assert "0 image(s); 1 unreadable" in capsys.readouterr().err
