"""Registry behaviour: registration, aliases, lookup errors, build."""

from __future__ import annotations

import pytest

import mmclip
from mmclip.registry import Registry


def test_register_get_alias_names_build() -> None:
    reg: Registry = Registry("widget")

    @reg.register("square", aliases=("sq",))
    def square(side: int = 2, scale: int = 1) -> int:
        return side * side * scale

    reg.add("cube", lambda side=2: side**3)
    assert reg.get("sq") is square and "sq" in reg and "square" in reg and len(reg) == 2
    assert reg.names() == ["cube", "square"] and reg.names("sq*") == ["square"]
    assert reg.build("square") == 4
    assert reg.build({"name": "sq", "side": 3}) == 9
    assert reg.build({"name": "square", "side": 3}, scale=2) == 18


def test_duplicate_names_raise() -> None:
    reg: Registry = Registry("widget")
    reg.add("a", int, aliases=("b",))
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", float)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("c", float, aliases=("b",))


def test_unknown_name_lists_known_and_closest() -> None:
    with pytest.raises(KeyError) as err:
        mmclip.IMAGE_TOWERS.get("clip_vitt")
    msg = str(err.value)
    assert "Did you mean 'clip_vit'" in msg and "clip_resnet" in msg and "timm" in msg


def test_spec_without_name() -> None:
    with pytest.raises(KeyError, match="needs a 'name' key"):
        mmclip.TEXT_TOWERS.build({"width": 3})


def test_builtins_registered() -> None:
    assert {"clip_vit", "clip_resnet", "timm"} <= set(mmclip.IMAGE_TOWERS.names())
    assert {"clip_text", "hf"} <= set(mmclip.TEXT_TOWERS.names())
    assert {"cls", "mean", "last", "map"} <= set(mmclip.POOLERS.names())


def test_import_mmclip_stays_light():
    """`import mmclip` (every CLI call and worker pays it) loads no data layer, Lightning or transformers; the
    parts that need them load on first use (``mmclip.collate_images`` included)."""
    import subprocess
    import sys

    code = (
        "import sys, mmclip\n"
        "heavy = [m for m in ('torchvision', 'mmclip.data', 'lightning', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(mmclip.collate_images) and 'mmclip.data' in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
