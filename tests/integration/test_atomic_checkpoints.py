"""Checkpoints survive kill -9 (atomic saves, no orphaned temporaries) and resume is bit-exact with random
layers in the step (patch dropout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mmclip.cli.train import build_trainer, compose, train
from mmclip.tasks.checkpoint_io import AtomicCheckpointIO, clean_stale_temporaries, is_checkpoint_temporary
from mmclip.tasks.contrastive import ContrastiveTask

# A writer process saves checkpoints of ~4 MB in a loop through a checkpoint IO; the driver forks it, kills
# it with SIGKILL after a random delay, then loads every checkpoint file left behind (fork: one import of
# torch for all rounds). Prints a JSON summary.
_KILLER = r"""
import importlib, json, os, random, signal, sys, time
from pathlib import Path
import torch

torch.set_num_threads(1)  # no intra-op thread pool in the parent: a forked child would deadlock on it
module, name = sys.argv[1].rsplit(".", 1)
io = getattr(importlib.import_module(module), name)()
folder, rounds = Path(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
weights = torch.randn(1_000_000)
summary = {"rounds": 0, "left": 0, "loaded": 0, "failed": [], "orphans_after_kill": 0, "rounds_saved": 0}
for r in range(rounds):
    pid = os.fork()
    if pid == 0:  # the writer: save until killed
        step = r * 1_000_000  # this round's steps: whether its writer got to save shows in last.ckpt
        while True:
            ckpt = {"global_step": step, "state_dict": {"w": weights + step}}
            io.save_checkpoint(ckpt, folder / "last.ckpt")
            io.save_checkpoint(ckpt, folder / f"step{step % 3}.ckpt")
            step += 1
    delay = rng.uniform(0.05, 0.6)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    summary["rounds"] += 1
    summary["orphans_after_kill"] += sum(1 for p in folder.iterdir() if p.name.startswith("."))
    for path in sorted(folder.glob("*.ckpt")):
        summary["left"] += 1
        try:
            ckpt = torch.load(path, weights_only=True)
            assert torch.equal(ckpt["state_dict"]["w"], weights + ckpt["global_step"])
            summary["loaded"] += 1
            summary["rounds_saved"] += path.name == "last.ckpt" and ckpt["global_step"] >= r * 1_000_000
        except Exception as err:
            summary["failed"].append(f"round {r}: {path.name}: {type(err).__name__}: {str(err)[:100]}")
            path.unlink()  # start the next round from loadable files
summary["hidden_before_next_save"] = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
io.save_checkpoint({"global_step": -1, "state_dict": {"w": weights}}, folder / "last.ckpt")  # the next save
summary["hidden_after_next_save"] = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
print(json.dumps(summary))
"""


def _other_filesystem_tmpdir(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's run folder")
    return Path(tempfile.mkdtemp(prefix="mmclip-ckpt-test-", dir=shm))


def kill_during_saves(io_class: str, tmp_path: Path, rounds: int) -> tuple[dict, list[str]]:
    """Runs the killer with TMPDIR on /dev/shm; returns its summary and what was left in TMPDIR."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    tmpdir = _other_filesystem_tmpdir(tmp_path)
    try:
        env = {**os.environ, "TMPDIR": str(tmpdir)}
        proc = subprocess.run(
            [sys.executable, "-c", _KILLER, io_class, str(folder), str(rounds)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), sorted(os.listdir(tmpdir))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.mark.slow
def test_kill_9_during_checkpoint_saves_leaves_loadable_checkpoints(tmp_path):
    summary, in_tmpdir = kill_during_saves("mmclip.tasks.checkpoint_io.AtomicCheckpointIO", tmp_path, rounds=20)
    print(json.dumps(summary))
    assert summary["rounds"] == 20
    assert summary["failed"] == []
    assert summary["left"] == summary["loaded"] > 0
    assert summary["hidden_after_next_save"] == []
    assert in_tmpdir == []


def test_stale_temporaries_are_cleaned_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename
    stale = tmp_path / f".last.ckpt.mmclip-tmp@{host}@{dead.pid}@0a1b2c3d"
    live = tmp_path / f".last.ckpt.mmclip-tmp@{host}@{os.getpid()}@0a1b2c3d"
    foreign = tmp_path / ".last.ckpt.mmclip-tmp@another-host.example@1@0a1b2c3d"
    other = tmp_path / ".last.ckpt.tmp"  # not ours: left alone
    for path in (stale, live, foreign, other):
        path.write_bytes(b"partial")
    assert is_checkpoint_temporary(stale.name) and not is_checkpoint_temporary(other.name)
    assert clean_stale_temporaries(tmp_path) == [stale]
    old = 3 * 24 * 3600
    os.utime(foreign, (foreign.stat().st_atime - old, foreign.stat().st_mtime - old))
    assert clean_stale_temporaries(tmp_path) == [foreign]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_atomic_save_replaces_follows_umask_and_cleans(tmp_path):
    io = AtomicCheckpointIO()
    folder = tmp_path / "new" / "checkpoints"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, folder / "last.ckpt")
    io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, folder / "last.ckpt")
    assert os.listdir(folder) == ["last.ckpt"]
    assert io.load_checkpoint(folder / "last.ckpt", weights_only=True)["step"] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, folder / "x.ckpt", storage_options={"a": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint({"bad": Unpicklable()}, folder / "last.ckpt")
    assert os.listdir(folder) == ["last.ckpt"]  # the failed save left no temporary, the old file intact
    assert io.load_checkpoint(folder / "last.ckpt", weights_only=True)["step"] == 2


def test_build_trainer_uses_atomic_checkpoints_unless_the_strategy_brings_its_own(tmp_path):
    cfg = compose("train", [f"run_dir={tmp_path}", "logger=none", "callbacks=none"])
    trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class Own(TorchCheckpointIO):
        pass

    from mmclip.cli.train import _wants_atomic_checkpoints

    assert not _wants_atomic_checkpoints("auto", [Own()])
    from lightning.pytorch.strategies import FSDPStrategy

    assert not _wants_atomic_checkpoints(FSDPStrategy(state_dict_type="sharded"), [])
    assert _wants_atomic_checkpoints(FSDPStrategy(state_dict_type="full"), [])


# ---- exact resume with random layers in the step (patch dropout) --------------------------------------
def _vit_shapes(run_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=shapes_tiny",
        f"run_dir={run_dir}",
        "report=false",
        "logger=none",
        "data.n_train=40",  # 5 batches an epoch: the resume point (step 5) is an epoch boundary
        "data.n_val=8",
        "data.n_test=8",
        "data.batch_size=8",
        "data.num_workers=0",
        "image_tower=vit_tiny",
        "image_tower.image_size=32",
        "image_tower.patch_size=8",
        "image_tower.width=32",
        "image_tower.layers=1",
        "image_tower.heads=2",
        "text_tower.width=32",
        "text_tower.layers=1",
        "trainer.deterministic=true",
        "trainer.max_steps=8",
        "scheduler.warmup_steps=2",
        "task.patch_dropout=0.5",
        "callbacks.checkpoint_steps.every_n_train_steps=5",
        *extra,
    ]


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("resume_step", [3, 5])
def test_resume_from_last_is_exact_with_patch_dropout(tmp_path, monkeypatch, resume_step):
    every = f"callbacks.checkpoint_steps.every_n_train_steps={resume_step}"
    straight = tmp_path / "straight"
    train(compose("train", _vit_shapes(straight, every)))

    crashed = tmp_path / "crashed"
    step = ContrastiveTask.training_step

    def crash_after_checkpoint(self, batch, batch_idx):
        if self.global_step == resume_step:  # the periodic checkpoint (and last.ckpt) of this step is written
            raise _Crash("simulated crash")
        return step(self, batch, batch_idx)

    with monkeypatch.context() as m:
        m.setattr(ContrastiveTask, "training_step", crash_after_checkpoint)
        with pytest.raises(_Crash):
            train(compose("train", _vit_shapes(crashed, every)))
    last = crashed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == resume_step
    train(compose("train", _vit_shapes(crashed, every, f"resume={last}")))

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert differ == [], f"{len(differ)} tensors differ after resuming, e.g. {differ[:3]}"
    assert not [p for p in (crashed / "checkpoints").iterdir() if p.name.startswith(".")]
