"""The vision-language road: the recipe composes, trains a few steps, writes its report, its checkpoint
reloads with the frozen parts checked, and `mmclip vlm` answers from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmclip.cli.train import compose, train

REPO = Path(__file__).resolve().parents[2]
TINY = [  # a random named image tower and a 2-block LM built in seconds
    "task.image_encoder=tiny-resnet", "task.image_layer=null", "task.lm_init.steps=5",
    "task.lm_init.config.n_embd=32", "task.lm_init.config.n_head=2", "trainer.max_steps=3",
    "data.batch_size=4", "data.num_workers=0", "task.evaluation.n_test=8", "logger=none",
    "trainer.enable_model_summary=false", "callbacks.checkpoint_steps.every_n_train_steps=3",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vlm")
    results = train(compose("vlm", ["experiment=vlm_shapes", f"run_dir={run_dir}", *TINY]))
    return run_dir, results


def test_the_recipe_trains_reports_and_reloads_with_only_the_bridge_trained(tiny_run):
    from mmclip.models.factory import create_model
    from mmclip.tasks.vlm import VLMTask

    run_dir, results = tiny_run
    assert "exact/colour/0shot" in results and "exact/count/2shot" in results
    saved = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert saved["thresholds"]["exact/colour/0shot"] == 0.9 and (run_dir / "report" / "summary.md").is_file()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    # the bridge, the new token embeddings and the frozen parts' fingerprints: no frozen weight is saved
    tops = {k.split(".")[1] for k in state["state_dict"]}
    assert tops == {"featurizer", "resampler", "new_token_embed", "cross_attn", "lm"}
    assert {k for k in state["state_dict"] if k.startswith(("model.featurizer", "model.lm"))} == {
        "model.featurizer.fingerprint", "model.lm.fingerprint"}
    optimized = {id(p) for g in state["optimizer_states"][0]["param_groups"] for p in g["params"]}
    task = VLMTask.load_from_checkpoint(ckpt, weights_only=True)
    assert len(optimized) == sum(1 for _ in task.model.parameters())  # the optimizer held exactly these
    # the frozen parts after training equal their sources bit for bit
    lm = __import__("transformers").AutoModelForCausalLM.from_pretrained(run_dir / "language_model")
    frozen = task.model.lm.frozen.state_dict()
    for key, value in lm.state_dict().items():
        matches = [k for k in frozen if k.replace(".block.", ".").replace(".base.", ".") == key]
        assert matches and all(torch.equal(frozen[k], value) for k in matches), key
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tower = create_model("tiny-resnet").image_tower
    for key, value in tower.state_dict().items():
        assert torch.equal(task.model.featurizer.tower.state_dict()[key], value), key
    gates = [float(b.attn_gate.detach()) for b in task.model.cross_attn]
    assert any(g != 0.0 for g in gates)  # the bridge did train


def test_vlm_cli_answers_a_prompt(tiny_run, tmp_path):
    from PIL import Image

    run_dir, _ = tiny_run
    image = tmp_path / "shape.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mmclip.cli.main", "vlm", str(run_dir / "checkpoints" / "last.ckpt"), str(image),
           "--prompt", "question: what colour is the shape? answer:", "--max-new-tokens", "3"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() or run.stdout == "\n"  # an answer line (the untrained bridge may say little)
    bad = subprocess.run(cmd[:-4] + ["--prompt", "<image><image>two markers"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "2 <image> markers for 1 images" in bad.stderr


def test_a_missing_image_tower_checkpoint_names_the_fix(tmp_path):
    from mmclip.tasks.vlm import VLMTask

    with pytest.raises(FileNotFoundError, match="make demo"):
        VLMTask(image_encoder=str(tmp_path / "nope.ckpt"), lm=str(tmp_path / "lm"))
