"""``mmclip.evaluation``: plumbing from batches to metrics, data-module handling, the results table."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
import torch.nn.functional as F
from rich.table import Table

from mmclip.evaluation import TASKS, eval_mode, evaluate, key_ids, results_table, run_retrieval
from mmclip.metrics import retrieval_metrics

from .fakes import FakeDataModule, FakeTokenizer, fake_model, make_split, standard_datamodule


def test_retrieval_plumbing_matches_the_metric_on_the_embeddings() -> None:
    dm = standard_datamodule(batch_size=5)
    s = dm.splits["val"]
    images = F.normalize(s.vectors.float(), dim=-1)
    texts = F.normalize(torch.cat(s.captions).float(), dim=-1)
    t2i = torch.repeat_interleave(torch.arange(len(s.keys)), torch.tensor([c.shape[0] for c in s.captions]))
    want = retrieval_metrics(images, texts, t2i, chunk_size=4)
    got = run_retrieval(fake_model(8), dm.retrieval_dataloader("val"), chunk_size=4)
    assert got == pytest.approx(want, abs=1e-12)


def test_evaluate_all_tasks_and_configure() -> None:
    dm = standard_datamodule()
    model = fake_model(8)
    tok = FakeTokenizer(dm.classnames, 8)
    res = evaluate(model, tok, dm)
    assert dm.configured["data_config"] == model.data_config and dm.configured["tokenizer"] is tok
    prefixes = {k.split("/")[0] for k in res}
    assert prefixes == set(TASKS)
    assert {
        "zeroshot/top1",
        "retrieval/t2i_R@1",
        "retrieval/paired_i2t_median_rank",
        "linear_probe/accuracy",
    } <= set(res)
    assert res["linear_probe/accuracy"] == 1.0  # class prototypes + small noise are separable
    assert evaluate(model, datamodule=dm, tasks=("retrieval",)).keys() == {
        k for k in res if k.startswith("retrieval/")
    }
    with pytest.raises(ValueError, match="unknown evaluation tasks"):
        evaluate(model, datamodule=dm, tasks=("zero-shot",))


def test_unlabelled_data_skips_classification_tasks(caplog: pytest.LogCaptureFixture) -> None:
    split = make_split(9, 8, seed=0)
    split.labels = None
    dm = FakeDataModule({"val": split, "test": split, "train": split}, None, FakeTokenizer(["a"], 8))
    with caplog.at_level(logging.WARNING, logger="mmclip.evaluation"):
        res = evaluate(fake_model(8), datamodule=dm)
    assert {k.split("/")[0] for k in res} == {"retrieval"}
    assert "skipping zero-shot" in caplog.text and "skipping the linear probe" in caplog.text


def test_eval_mode_restores_each_flag() -> None:
    model = fake_model(4)
    model.train()
    model.text_tower.eval()  # e.g. a locked tower kept in eval mode
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
    assert model.training and model.image_tower.training and not model.text_tower.training


def test_key_ids_are_stable_and_non_negative() -> None:
    ids = key_ids(["a", "b", "a", "x" * 1000])
    assert ids.dtype == torch.long and (ids >= 0).all()
    assert ids[0] == ids[2] != ids[1]
    # a pure function of the key (no per-process hash seed): blake2b-64, top bit cleared
    digest = hashlib.blake2b(b"a", digest_size=8).digest()
    assert key_ids(["a"]).item() == int.from_bytes(digest, "little") & (2**63 - 1) == 3405396810240292928


def test_results_table() -> None:
    table = results_table(
        {
            "zeroshot/top1": 0.5,
            "zeroshot/recall_cat": 1.0,
            "retrieval/t2i_mean_rank": 3.25,
            "linear_probe/l2": 1e-3,
        }
    )
    assert isinstance(table, Table)
    assert table.row_count == 4
    cells = [list(c.cells) for c in table.columns]
    assert cells[0] == ["zeroshot", "", "retrieval", "linear_probe"]
    assert cells[2] == ["0.5000", "1.0000", "3.2", "1e-03"]


def test_similarities_stay_full_precision_under_autocast() -> None:
    from mmclip.evaluation.callbacks import _amp_dtype
    from mmclip.metrics import RetrievalMetric, zeroshot_logits

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 16, generator=g), F.normalize(torch.randn(16, 5, generator=g), dim=0)
    images, texts = torch.randn(7, 16, generator=g), torch.randn(9, 16, generator=g)
    t2i = torch.randint(0, 7, (9,), generator=g)
    metric = RetrievalMetric()
    metric.update(images, torch.arange(7), texts, t2i)
    want_logits, want = zeroshot_logits(x, w), metric.compute()
    metric._computed = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_logits, got = zeroshot_logits(x, w), metric.compute()
    assert got_logits.dtype == torch.float32 and torch.equal(got_logits, want_logits)
    assert got == want

    class _T:
        def __init__(self, precision: str) -> None:
            self.precision = precision

    assert _amp_dtype(_T("bf16-mixed")) == torch.bfloat16 and _amp_dtype(_T("16-mixed")) == torch.float16
    assert _amp_dtype(_T("32-true")) is None and _amp_dtype(_T("bf16-true")) is None
