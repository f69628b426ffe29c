"""Closed-form and property tests for mmclip.tokenizers."""

from __future__ import annotations

import importlib.util
import itertools
import random
from pathlib import Path

import pytest
import torch

from mmclip import tokenizers as tk
from mmclip.tokenizers import ClipTokenizer, HFTokenizer, Tokenizer, find_clip_bpe_vocab, get_tokenizer

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def clip_tok() -> ClipTokenizer:
    if find_clip_bpe_vocab() is None:
        pytest.skip("CLIP's BPE vocabulary is not available (pip install open_clip_torch)")
    return ClipTokenizer()


def test_properties(clip_tok: ClipTokenizer) -> None:
    assert clip_tok.vocab_size == 49408
    assert (clip_tok.sot_token_id, clip_tok.eot_token_id, clip_tok.pad_token_id) == (SOT, EOT, 0)
    assert clip_tok.context_length == 77
    assert isinstance(clip_tok, Tokenizer)


def test_known_ids(clip_tok: ClipTokenizer) -> None:
    # "a</w>" is byte symbol 97 - 33 = 64 in the second block of 256; "!</w>" opens that block.
    assert clip_tok.encode("a") == [256 + 64]
    assert clip_tok.encode("!") == [256]
    assert clip_tok.encode("A photo of a cat") == [320, 1125, 539, 320, 2368]
    assert clip_tok.encode("  A\tphoto\n\nof a CAT  ") == clip_tok.encode("a photo of a cat")
    assert clip_tok.encode("&amp;amp;") == clip_tok.encode("&")
    assert clip_tok.encode("x <start_of_text> y <end_of_text>")[1::2] == [SOT, EOT]


def test_output_shape_dtype_and_padding(clip_tok: ClipTokenizer) -> None:
    out = clip_tok(["a photo of a cat", "dog"])
    assert out.shape == (2, 77) and out.dtype == torch.long
    assert out[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert (out[0, 7:] == 0).all() and (out[1, 3:] == 0).all()
    assert clip_tok("dog").shape == (1, 77)
    assert clip_tok(("a", "b", "c"), context_length=5).shape == (3, 5)


@pytest.mark.parametrize("text", ["", " ", "\t\n  "])
def test_empty_and_whitespace(clip_tok: ClipTokenizer, text: str) -> None:
    assert clip_tok(text)[0].tolist() == [SOT, EOT] + [0] * 75
    assert clip_tok.encode(text) == []


def test_truncation_keeps_eot_last(clip_tok: ClipTokenizer) -> None:
    fits = clip_tok("a " * 75)[0]  # sot + 75 ids + eot == 77: no truncation needed
    assert fits[0] == SOT and fits[-1] == EOT and (fits[1:-1] == 320).all()
    over = clip_tok(["a " * 76, "the cat " * 500])
    assert over.shape == (2, 77)
    assert (over[:, -1] == EOT).all() and (over[:, 0] == SOT).all() and (over != 0).all()
    assert (over[0, 1:-1] == 320).all()
    short = clip_tok("the cat " * 500, context_length=10)[0]
    assert short.shape == (10,) and short[-1] == EOT and (short[:-1] != EOT).all()


def test_context_length_validation(clip_tok: ClipTokenizer) -> None:
    with pytest.raises(ValueError, match="context_length"):
        clip_tok("a", context_length=-3)
    with pytest.raises(TypeError, match="list of strings"):
        clip_tok(["a", 3])  # type: ignore[list-item]


def _ascii_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "a photo of the big red dog running on grass near two small cats and blue sky".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def test_decode_round_trip(clip_tok: ClipTokenizer) -> None:
    for text in _ascii_sentences(100):
        assert clip_tok.decode(clip_tok.encode(text)) == text
        assert clip_tok.decode(clip_tok(text.upper())[0]) == text  # sot/eot/padding skipped, lower-cased
    # punctuation becomes its own word on decode
    assert clip_tok.decode(clip_tok.encode("A Cat, sitting!")) == "a cat , sitting !"
    assert clip_tok.decode(clip_tok.encode("héllo 日本 😀")) == "héllo 日本 😀"


def _without_open_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.delenv(tk.CLIP_BPE_ENV_VAR, raising=False)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "open_clip" else real_find_spec(name, *a, **k),
    )


def test_shipped_vocabulary_needs_no_open_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_open_clip(monkeypatch)
    assert find_clip_bpe_vocab() == tk.SHIPPED_CLIP_BPE
    import open_clip  # the dev extra's copy: the same ids

    import mmclip

    texts = ["a photo of a dog", "Two CATS, sleeping!", "héllo 日本 😀"]
    assert torch.equal(get_tokenizer("clip")(texts), open_clip.get_tokenizer("ViT-B-32")(texts))
    # open_clip users call the tokenizer by model name
    assert torch.equal(mmclip.get_tokenizer("ViT-B-32")(texts), open_clip.get_tokenizer("ViT-B-32")(texts))


def test_missing_vocabulary_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_open_clip(monkeypatch)
    monkeypatch.setattr(tk, "SHIPPED_CLIP_BPE", "/nonexistent/bpe_simple_vocab_16e6.txt.gz")
    assert find_clip_bpe_vocab() is None
    with pytest.raises(FileNotFoundError) as info:
        ClipTokenizer()
    message = str(info.value)
    assert "bpe_path" in message and "MMCLIP_CLIP_BPE" in message and "pip install open_clip_torch" in message
    with pytest.raises(FileNotFoundError, match="MMCLIP_CLIP_BPE"):
        get_tokenizer("clip")


def test_env_var_takes_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "vocab.txt.gz"
    fake.write_bytes(b"")
    monkeypatch.setenv(tk.CLIP_BPE_ENV_VAR, str(fake))
    assert find_clip_bpe_vocab() == str(fake)
    monkeypatch.setenv(tk.CLIP_BPE_ENV_VAR, str(tmp_path / "missing.gz"))
    with pytest.raises(FileNotFoundError, match="unset it"):
        find_clip_bpe_vocab()


def test_bad_bpe_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MMCLIP_CLIP_BPE"):
        ClipTokenizer(bpe_path=tmp_path / "nope.txt.gz")


def test_get_tokenizer_clip(clip_tok: ClipTokenizer) -> None:
    for name in ("clip", None):
        tok = get_tokenizer(name, context_length=16)
        assert isinstance(tok, ClipTokenizer) and tok.context_length == 16
        assert torch.equal(tok("a photo of a cat"), clip_tok("a photo of a cat", context_length=16))


def _synthetic_captions(n: int = 200, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    sizes, colors = ["small", "large", "tiny", "big"], ["red", "blue", "green", "yellow", "purple", "black"]
    shapes = ["circle", "square", "triangle", "star", "hexagon"]
    relations = ["to the left of", "to the right of", "above", "below", "next to"]
    captions = []
    for _ in range(n):
        a = f"a {rng.choice(sizes)} {rng.choice(colors)} {rng.choice(shapes)}"
        b = f"a {rng.choice(colors)} {rng.choice(shapes)}"
        captions.append(f"{a} {rng.choice(relations)} {b}")
    return captions


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe") / "tok"
    tok = tk.train_bpe_tokenizer(iter(_synthetic_captions()), vocab_size=300, out_dir=out)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300
    return out


def test_trained_tokenizer_round_trip(trained_dir: Path) -> None:
    tok = get_tokenizer(str(trained_dir))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == 300 and tok.context_length == 77
    sot, eot, pad = tok.sot_token_id, tok.eot_token_id, tok.pad_token_id
    assert len({sot, eot, pad}) == 3
    captions = _synthetic_captions(40, seed=123) + ["A Tiny RED Circle.", "a zebra ☃ near 日本 (42)!"]
    ids = tok(captions)
    assert ids.shape == (len(captions), 77) and ids.dtype == torch.long
    assert (ids < tok.vocab_size).all() and (ids >= 0).all()
    for caption, row in zip(captions, ids, strict=True):
        tokens = row.tolist()
        n = len(tokens) - sum(1 for _ in itertools.takewhile(lambda t: t == pad, reversed(tokens)))
        assert tokens[0] == sot and tokens[n - 1] == eot and pad not in tokens[:n]
        assert tok.decode(row) == caption.lower()
    # merges were learned: a training phrase takes far fewer tokens than its bytes
    assert int(tok("a small red circle", context_length=40).ne(pad).sum()) < len("a small red circle")


def test_trained_tokenizer_pads_and_truncates(trained_dir: Path) -> None:
    tok = HFTokenizer(trained_dir, context_length=8)
    long_row, short_row = tok(["a small red circle above a blue square " * 5, "a star"])
    assert long_row.shape == (8,) and long_row[0] == tok.sot_token_id and long_row[-1] == tok.eot_token_id
    assert (long_row != tok.pad_token_id).all()
    assert short_row[0] == tok.sot_token_id and (short_row[-3:] == tok.pad_token_id).all()
    assert tok("a star", context_length=20).shape == (1, 20)
    lowered = HFTokenizer(trained_dir, clean="lower")
    assert torch.equal(lowered("A&amp;amp;B   Star"), tok("a&b star", context_length=77))


def test_train_bpe_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 259"):
        tk.train_bpe_tokenizer(["a b"], vocab_size=100, out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="no captions"):
        tk.train_bpe_tokenizer([], vocab_size=300, out_dir=tmp_path / "y")
    with pytest.raises(TypeError, match="strings"):
        tk.train_bpe_tokenizer(["ok", 5], vocab_size=300, out_dir=tmp_path / "z")  # type: ignore[list-item]


def test_hf_tokenizer_bad_clean(trained_dir: Path) -> None:
    with pytest.raises(ValueError, match="clean must be one of"):
        HFTokenizer(trained_dir, clean="upper")
