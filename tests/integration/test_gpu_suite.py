"""The GPU suite stays runnable: its smoke mode walks every section with tiny models on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_gpu_suite_smoke_runs_every_section(tmp_path):
    pytest.importorskip("open_clip")
    pytest.importorskip("webdataset")
    out = tmp_path / "suite.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--eager-only", "--out", str(out)],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert set(sections) == {"train", "embed_image", "embed_text", "loader", "fsdp"}
    for name in ("train", "embed_image", "embed_text", "loader"):
        assert "error" not in sections[name], sections[name].get("traceback")
        assert sections[name]["rows"], name
    rates = {r["model"]: r["samples_per_s"] for r in sections["train"]["rows"]}
    assert set(rates) == {"mmclip eager", "open_clip eager"} and min(rates.values()) > 0
    impls = {(r["model"], r["impl"]) for r in sections["embed_image"]["rows"]}
    assert impls == {(m, i) for m in ("ViT-B-16", "ViT-B-32") for i in ("mmclip", "open_clip", "timm")}
    assert {r["loader"] for r in sections["loader"]["rows"]} == {"mmclip", "open_clip"}
    assert all(r["images_per_s"] > 0 for r in sections["loader"]["rows"])
    if not torch.cuda.is_available():
        assert "FSDP shards over CUDA GPUs" in sections["fsdp"]["error"]
    # FLOPs per sample: the model's forward counted once, times three (forward + backward)
    assert result["train_flops_per_sample"] > 0 and result["train_flops_per_sample"] % 3 == 0
