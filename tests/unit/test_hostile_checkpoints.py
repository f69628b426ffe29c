"""Checkpoint files that are empty, truncated, integer, NaN or TorchScript: each read safely or refused with
an error that names the file or keys and the fix."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import mmclip
from mmclip.models.convert import CheckpointError, load_state_dict
from mmclip.models.convert.checkpoint import load_checkpoint, read_torchscript_tensors


@pytest.fixture(scope="module")
def model():
    return mmclip.create_model("tiny-vit")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_int32_weights_are_refused_with_their_keys(model):
    state = _state(model)
    state["image_proj.weight"] = state["image_proj.weight"].to(torch.int32)
    with pytest.raises(CheckpointError, match=r"non-floating.*image_proj\.weight: checkpoint torch\.int32") as err:
        load_checkpoint(model, state)
    assert "convert them to float" in str(err.value)


def test_nan_weights_are_refused_with_their_keys(model):
    state = _state(model)
    state["text_proj.weight"][0, 0] = float("nan")
    state["logit_scale"] = torch.tensor(float("inf"))
    with pytest.raises(CheckpointError, match=r"2 tensors with NaN or inf.*earlier checkpoint") as err:
        load_checkpoint(model, state)
    assert "text_proj.weight" in str(err.value) and "logit_scale" in str(err.value)
    load_checkpoint(model, _state(model))  # a clean state (masks of -inf included) still loads


def test_truncated_safetensors_names_the_file(tmp_path, model):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_empty_file_says_empty(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\).*interrupted") as err:
        load_state_dict(path)
    assert str(path) in str(err.value) and "pickl" not in str(err.value)


def test_truncated_pt_says_truncated(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)


# ---- TorchScript archives: tensors read, code never run ---------------------------------------------------
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.plain = torch.zeros(1)  # a tensor attribute, neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x)) * self.scale + self.plain


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4).half()
        self.blocks = nn.Sequential(_Block(), _Block())
        self.head = nn.Linear(4, 2, bias=False)
        self.head.weight = nn.Parameter(self.head.weight.t().contiguous().t())  # a non-contiguous view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x.half()).float()))


def _no_jit_load(*args, **kwargs):
    raise AssertionError("torch.jit.load runs the archive's code and must not be called")


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_tensors_are_read_without_running_code(tmp_path, monkeypatch, how):
    torch.manual_seed(0)
    net = _Net().eval()
    for block in net.blocks:
        block.norm.running_mean.normal_()
    scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.randn(2, 3))
    path = tmp_path / f"{how}.pt"
    scripted.save(str(path))
    monkeypatch.setattr(torch.jit, "load", _no_jit_load)
    state = load_state_dict(path)
    expected = net.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def test_torchscript_archive_with_foreign_globals_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "net.pt"
    torch.jit.script(_Net()).save(str(path))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "hostile.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(hostile, "w") as dst:
        for name in src.namelist():
            data = pickle.dumps(Payload(), protocol=2) if name.endswith("/data.pkl") else src.read(name)
            dst.writestr(name, data)
    monkeypatch.setattr(torch.jit, "load", _no_jit_load)
    with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system.*torch\.save\(model\.state_dict"):
        read_torchscript_tensors(hostile)
    assert not marker.exists()


def test_plain_checkpoints_still_load(tmp_path, model):
    path = tmp_path / "w.pt"
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buffer)
    path.write_bytes(buffer.getvalue())
    state = load_state_dict(path)
    assert sorted(state) == sorted(model.state_dict())
