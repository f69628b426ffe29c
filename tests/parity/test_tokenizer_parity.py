"""Id-for-id parity of mmclip's CLIP tokenizer with open_clip (the oracle) and transformers."""

from __future__ import annotations

import gzip
import json
import random
import string
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from mmclip.tokenizers import ClipTokenizer, find_clip_bpe_vocab, get_tokenizer  # noqa: E402

_WORDS = (
    "a photo of the cat dog sitting on red blue green table under tree with two three small large "
    "person riding horse beach sunset city street night car bicycle man woman child playing ball "
    "kitchen pizza plate airplane sky cloudy mountain snow river boat building window wooden chair"
).split()
_CONTRACTIONS = "it's we'll they're I've I'm she'd don't can't IT'S We'LL o'clock".split()
_PUNCT = (
    ". , ! ? ... !? ; : - -- ( ) [x] \" ' #1 @home $5.99 100% a/b c++ e-mail _under_ ~ ` ^ | {} \\ *".split()
)
_ACCENTED = "café naïve Ørsted Straße ÉCOLE jalapeño Zürich façade ÅNGSTRÖM crème_brûlée".split()
_SCRIPTS = (
    "日本語のテキスト|中文字符|한국어 문장|Привет, мир|ЁЛКА|مرحبا بالعالم|שלום|Ελληνικά|हिन्दी|ภาษาไทย|ქართული"
).split("|")
_EMOJI = "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 🇺🇸🇫🇷 ❤️ 🤷‍♂️ ☃ ✔︎ 🧑🏿‍🚀 1️⃣".split()
_HTML = (
    "&amp;amp; &lt;b&gt; &quot;hi&quot; &#39; &nbsp; &#x1F600; &amp; &copy;2024 &lt;/w&gt; &eacute;t&eacute; "
    "<b>&amp;amp;</b> &amp;amp;amp; &#28;x&#x85;y <i>&lt;&gt;</i>"
).split()
_MOJIBAKE = (
    "â€™|Ã©tÃ©|doesnÃ¢â‚¬â„¢t|The Mona Lisa doesnâ€™t have eyebrows.|â€œquotedâ€\x9d|ÃƒÂ©|Ã¼ber|mÃ¶tley crÃ¼e"
).split("|")
_SPACES = "\t|\n|   |\r\n|\u00a0|\u2003|\u3000|\x0b|\x0c|\u2028|\x85".split("|")
_CONTROL = "\x00|\x07|\x1b[31m|\x7f|\u200b|\ufeff|\x1c\x1d\x1e\x1f|\u200d|\x01x\x02".split("|")
_SPECIALS = "<|startoftext|> <|endoftext|> <start_of_text> <END_OF_TEXT> </w> <| |>".split()
_SEPARATORS = " | | ||  |\t|\n|, |-| \n\t ".split("|")
_RANDOM_RANGES = [
    (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
    (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF), (0x1F300, 0x1F64F), (0x2000, 0x206F),
]  # fmt: skip
_FIXED = [
    "", " ", "   ", "\t\n", "\n\n\n", "a", "A", "!", "0", "1234567890", "it's", "we'll", "<|startoftext|>",
    "<|endoftext|>", "<start_of_text>", "<end_of_text>", "a <start_of_text> b <end_of_text> c", "&amp;amp;",
    "&lt;b&gt;", "<b>&amp;amp;</b>", "â€™", "👨‍👩‍👧‍👦", "🇯🇵🇺🇸", "x" * 3000, "word " * 200, "!" * 500,
    "a photo of a cat.", "A PHOTO OF A CAT", "'s 't 're 've 'm 'll 'd", "''s", "1.5e-10", "\x00\x00",
]  # fmt: skip

_POOLS = [_CONTRACTIONS, _PUNCT, _ACCENTED, _SCRIPTS, _EMOJI, _HTML, _MOJIBAKE, _SPACES, _CONTROL, _SPECIALS]


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(13)
    if kind <= 3:
        word = rng.choice(_WORDS)
        return rng.choice([word, word.upper(), word.title(), word.swapcase(), word + rng.choice(_PUNCT)])
    if kind - 4 < len(_POOLS):
        return rng.choice(_POOLS[kind - 4])
    lo, hi = rng.choice(_RANDOM_RANGES)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6)))


def _corpus(n: int = 2200, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    texts = list(_FIXED)
    while len(texts) < n:
        n_frag = rng.choice([1, 2, 3, 5, 8, 12, 20]) if rng.random() > 0.02 else rng.randint(100, 600)
        pieces = [_fragment(rng) for _ in range(n_frag)]
        text = pieces[0]
        for piece in pieces[1:]:
            text += rng.choice(_SEPARATORS) + piece
        if rng.random() < 0.05:
            text = rng.choice(_SPACES) + text + rng.choice(_SPACES)
        if rng.random() < 0.03:
            text = "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 200)))
        texts.append(text)
    return texts


def _plain_ascii_corpus(n: int = 300, seed: int = 99) -> list[str]:
    rng = random.Random(seed)
    pool = _WORDS + _CONTRACTIONS + [".", ",", "!", "?", "...", "-", "(", ")", "#1", "$5.99", "100%", "c++"]
    return [
        rng.choice(["", " "])
        + rng.choice([" ", "  ", ", "]).join(rng.choice(pool) for _ in range(rng.choice([1, 3, 6, 10, 40])))
        for _ in range(n)
    ]


CORPUS = _corpus()


@pytest.fixture(scope="module")
def clip_tok() -> ClipTokenizer:
    return ClipTokenizer()


def _oracle(texts: list[str], context_length: int = 77) -> torch.Tensor:
    return open_clip.tokenize(texts, context_length=context_length)


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, texts: list[str]) -> None:
    assert ours.dtype == torch.long and ours.shape == ref.shape
    if not torch.equal(ours, ref):
        bad = int((ours != ref).any(dim=1).nonzero()[0])
        raise AssertionError(
            f"mismatch for {texts[bad]!r}:\n ours={ours[bad].tolist()}\n open_clip={ref[bad].tolist()}"
        )


def test_corpus_is_varied() -> None:
    assert len(CORPUS) >= 2000
    assert len(set(CORPUS)) > 1900
    assert "" in CORPUS and any(len(t) > 2000 for t in CORPUS)
    assert sum(len(open_clip.tokenizer._tokenizer.encode(t)) > 77 for t in CORPUS[:400]) > 5


@pytest.mark.parametrize("start", range(0, len(CORPUS), 550))
def test_matches_open_clip(clip_tok: ClipTokenizer, start: int) -> None:
    batch = CORPUS[start : start + 550]
    _assert_same(clip_tok(batch), _oracle(batch), batch)


@pytest.mark.parametrize("context_length", [1, 2, 5, 16, 200])
def test_matches_open_clip_other_context_lengths(clip_tok: ClipTokenizer, context_length: int) -> None:
    batch = CORPUS[::7]
    _assert_same(clip_tok(batch, context_length=context_length), _oracle(batch, context_length), batch)


def test_encode_and_decode_match_open_clip(clip_tok: ClipTokenizer) -> None:
    ref = open_clip.tokenizer._tokenizer
    for text in CORPUS[::11]:
        ids = clip_tok.encode(text)
        assert ids == ref.encode(text), text
        assert clip_tok.decode(ids) == ref.decode(ids).strip()


def _bytes_to_unicode_for_test() -> list[str]:
    """GPT-2's byte table in vocabulary order, written out independently of mmclip."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(others))]


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bpe = find_clip_bpe_vocab()
    assert bpe is not None
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode_for_test()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = tmp_path_factory.mktemp("hf_clip")
    (out / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8"
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return out


def test_hf_dir_vocab_agrees_with_open_clip(hf_clip_dir: Path) -> None:
    vocab = json.loads((hf_clip_dir / "vocab.json").read_text("utf-8"))
    ref = open_clip.tokenizer._tokenizer.encoder
    assert len(vocab) == len(ref) == 49408
    assert all(vocab[t] == i for t, i in ref.items() if i < 49406)


def test_from_hf_dir_matches_open_clip(hf_clip_dir: Path) -> None:
    tok = ClipTokenizer.from_hf_dir(hf_clip_dir)
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, 49406, 49407)
    _assert_same(tok(CORPUS), _oracle(CORPUS), CORPUS)


def test_get_tokenizer_picks_clip_for_hf_clip_dir(hf_clip_dir: Path) -> None:
    tok = get_tokenizer(str(hf_clip_dir), context_length=32)
    assert isinstance(tok, ClipTokenizer) and tok.context_length == 32
    _assert_same(tok(CORPUS[:300]), _oracle(CORPUS[:300], 32), CORPUS[:300])


def test_matches_transformers_clip_tokenizer(clip_tok: ClipTokenizer, hf_clip_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    try:
        hf = transformers.CLIPTokenizer.from_pretrained(str(hf_clip_dir))
    except Exception as err:  # any loader failure means "cannot compare here"
        pytest.skip(f"transformers' CLIPTokenizer cannot load the directory: {err}")
    texts = _plain_ascii_corpus()
    ours = clip_tok(texts)
    theirs = torch.tensor(hf(texts, padding="max_length", truncation=True, max_length=77)["input_ids"])
    assert theirs.shape == ours.shape
    for text, row, ref in zip(texts, ours, theirs, strict=True):
        n = row.tolist().index(clip_tok.eot_token_id) + 1  # unpadded prefix: HF pads with eot, we with 0
        assert row[:n].tolist() == ref[:n].tolist(), text
        assert (ref[n:] == hf.pad_token_id).all()


# ---- OpenCLIP's Hugging Face tokenizer wrapper: cleaning modes and options -----------------------------------
@pytest.mark.parametrize("mode", ["whitespace", "lower", "canonicalize"])
def test_clean_modes_match_openclip(mode: str) -> None:
    """SigLIP / SigLIP 2 names clean text with "canonicalize" (lower-cased, punctuation removed)."""
    from open_clip.tokenizer import get_clean_fn

    from mmclip.tokenizers import _clean

    reference = get_clean_fn(mode)
    for text in CORPUS + ["A_Photo_of a DOG!!", "it's   (42)  {x}", "&amp;amp;Café_Crème."]:
        assert _clean(text, mode) == reference(text), repr(text)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small WordPiece tokenizer with [CLS] / [SEP] (the kind OpenCLIP's CLIPA models strip [SEP] from)."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("bert")
    words = sorted({w.lower().strip(string.punctuation) for w in _WORDS} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits, *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(str(root / "tok"))
    return root / "tok"


@pytest.mark.parametrize(
    "options", [{"clean": "canonicalize"}, {"clean": "whitespace"}, {"clean": "lower", "strip_sep_token": True}]
)
def test_hf_tokenizer_options_match_openclip(bert_dir: Path, options: dict) -> None:
    from open_clip.tokenizer import HFTokenizer as OpenClipHF

    ours = get_tokenizer({"name": str(bert_dir), **options}, context_length=32)
    theirs = OpenClipHF(str(bert_dir), context_length=32, **options)
    texts = _plain_ascii_corpus(120) + ["A_Photo_of a DOG!!", "it's (42)", ""]
    assert torch.equal(ours(texts), theirs(texts))
    if options.get("strip_sep_token"):
        assert not (ours(texts) == ours.tokenizer.sep_token_id).any()


def test_model_get_tokenizer_takes_tokenizer_options(bert_dir: Path) -> None:
    """``mmclip.get_tokenizer({"name": dir, **options})`` builds that tokenizer (not a model spec's)."""
    import mmclip
    from mmclip.tokenizers import HFTokenizer

    tok = mmclip.get_tokenizer({"name": str(bert_dir), "clean": "canonicalize"}, context_length=16)
    assert isinstance(tok, HFTokenizer) and tok.clean == "canonicalize"
    assert torch.equal(tok(["A_Dog!"]), tok(["a dog"]))
