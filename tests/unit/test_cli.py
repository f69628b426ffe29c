"""The `mmclip` command (what `make demo` runs today)."""

from __future__ import annotations

import pytest

from mmclip.cli.main import main, model_table
from mmclip.models.factory import count_parameters, create_model


def test_model_table_rows_come_from_real_modules() -> None:
    rows = {r["name"]: r for r in model_table("tiny-*")}
    assert set(rows) == {
        "tiny-bert",
        "tiny-convnext",
        "tiny-naflex",
        "tiny-efficientnet",
        "tiny-resnet",
        "tiny-siglip",
        "tiny-vit",
        "tiny-vit-quickgelu",
    }
    counts = count_parameters(create_model("tiny-resnet"))
    assert rows["tiny-resnet"]["total_m"] * 1e6 == pytest.approx(counts["total"])
    assert rows["tiny-resnet"]["resolution"] == 64


def test_cli_prints_table_and_rejects_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "tiny-vit*"]) == 0
    out = capsys.readouterr().out
    assert "tiny-vit-quickgelu" in out and "embed" in out
    assert main(["models", "nothing-matches"]) == 1
    assert main(["frobnicate"]) == 2
