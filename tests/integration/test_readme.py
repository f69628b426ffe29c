"""Every python block in README.md runs as written (what a new user pastes into a shell)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})


def _commands() -> list[list[str]]:
    """The `mmclip train | eval | embed` command lines of the README's bash blocks, as the shell splits them."""
    import shlex

    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if re.match(r"(\S+=\S+ )*mmclip (train|eval|embed) ", line):
                out.append(shlex.split(line[line.index("mmclip") :]))
    return out


COMMANDS = _commands()


def test_readme_has_commands() -> None:
    assert len(COMMANDS) >= 8


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_composes(argv: list[str]) -> None:
    """Each command's overrides parse and compose against the recipes (braces quoted, keys that exist)."""
    from mmclip.cli.train import compose

    command, args = argv[1], [a for a in argv[2:] if a not in ("--cfg", "job")]
    name = {"train": "train", "eval": "eval", "embed": "embed"}[command]
    if "-cn" in args:
        i = args.index("-cn")
        name, args = args[i + 1], args[:i] + args[i + 2 :]
    cfg = compose(name, args)
    assert cfg.name
