"""``mmclip embed`` / ``mmclip search`` end to end: kill and resume, DDP, and search finding the right image."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mmclip
from mmclip.cli.embed import embed, model_from_spec, model_spec
from mmclip.cli.embed import main as embed_main
from mmclip.cli.search import main as search_main
from mmclip.cli.train import compose
from mmclip.data.synthetic import SyntheticShapes
from mmclip.embedding.search import faiss_available
from mmclip.embedding.writer import EmbeddingStore, write_embeddings

REPO = Path(__file__).resolve().parents[2]
N = 22


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A folder of 22 scenes (one in a subfolder), and tiny-vit weights in a safetensors file."""
    root = tmp_path_factory.mktemp("corpus")
    shapes = SyntheticShapes("val", N, image_size=40)
    (root / "images" / "sub").mkdir(parents=True)
    for i in range(N):
        shapes.get(i).image.save(root / "images" / ("sub/" if i == 5 else "") / f"img{i:03d}.png")
    torch.manual_seed(123)
    model = mmclip.create_model("tiny-vit")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tiny.safetensors"))
    return {"images": root / "images", "checkpoint": root / "tiny.safetensors"}


def _overrides(corpus: dict[str, Path], out: Path, run: Path, *extra: str) -> list[str]:
    return [
        f"checkpoint={corpus['checkpoint']}",
        "source.kind=images",
        f"source.path={corpus['images']}",
        f"out={out}",
        f"run_dir={run}",
        "batch_size=3",
        "shard_size=4",
        "num_workers=2",
        "progress=false",
        *extra,
    ]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _cli(args: list[str], log: Path, **env: str) -> int:
    cmd = [sys.executable, "-m", "mmclip.cli.embed", *args]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    with open(
        log, "w"
    ) as f:  # files, not pipes: orphaned loader workers of a killed run may hold a pipe open
        return subprocess.run(
            cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT, timeout=600
        ).returncode


def test_killed_and_resumed_run_is_byte_identical(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = _overrides(corpus, out, tmp_path / "run")
    rc = _cli(args, tmp_path / "killed.log", MMCLIP_EMBED_TEST_KILL_AFTER="2")
    assert rc == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    done = sorted(p.name for p in out.glob("ids-*.parquet"))
    embs = sorted(p.name for p in out.glob("emb-*.npy"))
    assert len(done) == 2 and len(embs) == 3, (done, embs)  # killed between a shard's embeddings and its ids
    assert (out / "meta.json").is_file()

    assert embed_main(args) == 0  # the same command again, in this process
    assert "(2 of 6 were done before)" in " ".join(capsys.readouterr().out.split())

    reference = tmp_path / "reference"
    embed(compose("embed", _overrides(corpus, reference, tmp_path / "run_ref")))
    assert _files(out) == _files(reference)  # every file, meta.json included, byte for byte
    names = {f"{kind}-{i:05d}.{ext}" for kind, ext in (("emb", "npy"), ("ids", "parquet")) for i in range(6)}
    assert set(_files(out)) == {"meta.json", *names}  # no temporary files left behind


@pytest.mark.slow
def test_two_ddp_processes_write_the_same_store(corpus, tmp_path):
    out = tmp_path / "ddp"
    args = _overrides(corpus, out, tmp_path / "run", "accelerator=cpu", "devices=2", "strategy=ddp")
    rc = _cli(args, tmp_path / "ddp.log")
    assert rc == 0, (tmp_path / "ddp.log").read_text()[-3000:]
    reference = tmp_path / "reference"
    embed(compose("embed", _overrides(corpus, reference, tmp_path / "run_ref", "num_workers=0")))
    assert _files(out) == _files(reference)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_search_finds_the_image_of_each_caption(corpus, tmp_path, capsys):
    """A store whose image rows hold the text embeddings of their captions (known embeddings): each caption,
    embedded by the model `mmclip search` rebuilds from meta.json, must find its own image with score 1."""
    spec = model_spec(compose("embed", _overrides(corpus, tmp_path / "out", tmp_path / "run")))
    model, tokenizer = model_from_spec(spec)
    shapes = SyntheticShapes("val", N, image_size=40)
    captions = [shapes.get(i).captions[0] for i in range(N)]
    with torch.no_grad():
        text = model.encode_text(tokenizer(captions), normalize=True)
    ids = [f"img{i:03d}.png" for i in range(N)]
    write_embeddings(tmp_path / "store", text, ids, captions=captions, shard_size=5, model=spec)
    queries = [arg for c in captions[:8] for arg in ("--text", c)]
    assert search_main([str(tmp_path / "store"), *queries, "-k", "3", "--json", "--chunk-size", "3"]) == 0
    hits = _json_lines(capsys.readouterr().out)
    assert len(hits) == 8 * 3
    for i, caption in enumerate(captions[:8]):
        best = next(h for h in hits if h["query"] == caption and h["rank"] == 0)
        assert best["id"] == ids[i] and best["caption"] == caption
        assert best["score"] == pytest.approx(1.0, abs=2e-3)
    assert search_main([str(tmp_path / "store"), "--text", captions[3], "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "img003.png" in table and "1.00" in table


def test_embed_cli_then_image_search_finds_the_same_image(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert embed_main(_overrides(corpus, out, tmp_path / "run", "num_workers=0")) == 0
    store = EmbeddingStore(out)
    assert (
        store.complete and len(store) == N and store.meta["model"]["checkpoint"] == str(corpus["checkpoint"])
    )
    assert (
        search_main([str(out), "--image", str(corpus["images"] / "sub" / "img005.png"), "--json", "-k", "3"])
        == 0
    )
    hits = _json_lines(capsys.readouterr().out)
    assert hits[0]["id"] == "sub/img005.png" and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert hits[1]["score"] < hits[0]["score"]
    # a query embedding file gives the same answer without rebuilding the model
    np.save(tmp_path / "q.npy", store.embeddings(np.float32)[7])
    assert search_main([str(out), "--embedding", str(tmp_path / "q.npy"), "--json", "-k", "1"]) == 0
    assert _json_lines(capsys.readouterr().out)[0]["row"] == 7


@pytest.mark.skipif(faiss_available(), reason="checks the message shown when faiss is missing")
def test_search_faiss_flag_without_faiss_says_how_to_install(tmp_path, capsys):
    write_embeddings(tmp_path / "store", np.eye(3), ["a", "b", "c"])
    np.save(tmp_path / "q.npy", np.eye(3)[0])
    assert search_main([str(tmp_path / "store"), "--embedding", str(tmp_path / "q.npy"), "--faiss"]) == 2
    assert "pip install faiss-cpu" in capsys.readouterr().err


def test_search_refuses_an_incomplete_store(corpus, tmp_path, capsys):
    out = tmp_path / "store"
    write_embeddings(out, np.eye(4), ["a", "b", "c", "d"], shard_size=2)
    (out / "ids-00001.parquet").unlink()
    assert search_main([str(out), "--embedding", str(tmp_path / "missing.npy")]) == 2
    assert "1 of 2 shards" in capsys.readouterr().err
