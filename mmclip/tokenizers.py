"""Text tokenizers for mmclip: CLIP's byte-level BPE, Hugging Face tokenizers, and BPE training.

Every tokenizer here is a callable ``tokenizer(texts, context_length=None) -> LongTensor (N, L)`` and
exposes ``vocab_size``, ``context_length``, ``pad_token_id`` and ``eot_token_id`` (see :class:`Tokenizer`).

* :class:`ClipTokenizer` reimplements the tokenizer of OpenAI CLIP / open_clip (``SimpleTokenizer``) and
  produces the same ids as ``open_clip.tokenize``. mmclip does not ship OpenAI's vocabulary file; it is
  located with :func:`find_clip_bpe_vocab` or read from a Hugging Face CLIP tokenizer directory.
* :class:`HFTokenizer` wraps any ``transformers`` tokenizer (local directory or hub id).
* :func:`train_bpe_tokenizer` trains a small byte-level BPE on your own captions.
* :func:`get_tokenizer` picks the right one from a name or a path.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import logging
import os
import string
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import pairwise
from typing import Any, Protocol, runtime_checkable

import ftfy
import regex
import torch

__all__ = [
    "CLIP_BPE_ENV_VAR",
    "ClipTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "find_clip_bpe_vocab",
    "get_tokenizer",
    "train_bpe_tokenizer",
]

logger = logging.getLogger(__name__)

CLIP_BPE_ENV_VAR = "MMCLIP_CLIP_BPE"
"""Environment variable that may point at ``bpe_simple_vocab_16e6.txt.gz``."""

_CLIP_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
_CLIP_VOCAB_SIZE = 49408
_CLIP_NUM_MERGES = 49152 - 256 - 2  # 48,894 merge lines are used from the merges file
_DEFAULT_CONTEXT_LENGTH = 77
_SOT = "<|startoftext|>"
_EOT = "<|endoftext|>"
_PAD = "<|pad|>"
_EOW = "</w>"
# open_clip recognises these two literal strings *inside the text* as start/end tokens (OpenAI's original
# tokenizer used "<|startoftext|>"/"<|endoftext|>" instead). We follow open_clip, our parity oracle.
_TEXT_SPECIALS = ("<start_of_text>", "<end_of_text>")
_CLIP_PATTERN = regex.compile(
    "|".join(regex.escape(s) for s in _TEXT_SPECIALS)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_BPE_CACHE_SIZE = 200_000
# CLIP's word classes for trained tokenizers, each word keeping the space before it (GPT-2 style).
_TRAIN_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+"""
_CLEAN_MODES = ("none", "whitespace", "lower", "canonicalize")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
#: the copy of CLIP's merges file shipped in the wheel (OpenAI's MIT licence beside it)
SHIPPED_CLIP_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", _CLIP_BPE_FILENAME)

_INSTALL_HINT = (
    "pass bpe_path=... (the gzip'd merges file bpe_simple_vocab_16e6.txt.gz), set the environment "
    f"variable {CLIP_BPE_ENV_VAR} to its location, or `pip install open_clip_torch` (which carries it)"
)


@runtime_checkable
class Tokenizer(Protocol):
    """What mmclip models and data pipelines expect from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def pad_token_id(self) -> int: ...
    @property
    def eot_token_id(self) -> int: ...
    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor: ...


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes map, in increasing byte order, to
    the characters ``chr(256)``, ``chr(257)``, ... The dict's insertion order (printable bytes first) is
    the order CLIP uses for the first 256 vocabulary entries.
    """
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def _clean(text: str, mode: str) -> str:
    """CLIP's text cleaning for ``mode`` "whitespace" or "lower"; "none" returns ``text`` unchanged.

    ftfy repair, HTML unescape twice, whitespace runs to one space (stripped), and for "lower" lower-casing.
    "canonicalize" is SigLIP's as OpenCLIP applies it: the same repair, then underscores to spaces, ASCII
    punctuation removed, lower-cased, whitespace runs to one space.
    """
    if mode == "none":
        return text
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    if mode == "canonicalize":
        text = text.strip().replace("_", " ").translate(_NO_PUNCTUATION).lower()
    # Whitespace follows str.split(), as open_clip does (the regex module's \s differs on \x1c-\x1f).
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


def _check_context_length(context_length: int) -> int:
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}.")
    return context_length


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(
            f"Tokenizers take a string or a list of strings, got {type(texts).__name__}; "
            "convert each caption with str() first."
        )
    return list(texts)


def find_clip_bpe_vocab() -> str | None:
    """Locate OpenAI CLIP's merges file ``bpe_simple_vocab_16e6.txt.gz``.

    Looks at the environment variable ``MMCLIP_CLIP_BPE`` first, then at the copy mmclip ships
    (``mmclip/assets``, under OpenAI's MIT licence), then next to an installed ``open_clip`` package.

    Returns:
        The path of the file, or ``None`` when it cannot be found.

    Raises:
        FileNotFoundError: ``MMCLIP_CLIP_BPE`` is set but names no file.
    """
    env_path = os.environ.get(CLIP_BPE_ENV_VAR)
    if env_path:
        if not os.path.isfile(env_path):
            raise FileNotFoundError(
                f"{CLIP_BPE_ENV_VAR}={env_path!r} is not a file: point it at {_CLIP_BPE_FILENAME} or unset it"
            )
        return env_path
    if os.path.isfile(SHIPPED_CLIP_BPE):
        return SHIPPED_CLIP_BPE
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        candidate = os.path.join(os.path.dirname(spec.origin), _CLIP_BPE_FILENAME)
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_clip_merges(bpe_path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read the merges CLIP uses from a gzip'd merges file (header line, then ``"a b"`` lines)."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : _CLIP_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != _CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{bpe_path} is not a CLIP merges file (a header line, then {_CLIP_NUM_MERGES}+ 'a b' lines); "
            f"use {_CLIP_BPE_FILENAME}."
        )
    return merges  # type: ignore[return-value]


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer, id-for-id identical to open_clip's ``SimpleTokenizer``.

    Text is cleaned (ftfy, HTML unescape twice, whitespace collapsed, lower-cased), split with CLIP's
    regex, mapped to byte symbols and merged with BPE; each word's last symbol carries ``"</w>"``.

    Args:
        bpe_path: the gzip'd merges file ``bpe_simple_vocab_16e6.txt.gz``. ``None`` locates it with
            :func:`find_clip_bpe_vocab`.
        context_length: default number of tokens per row returned by :meth:`__call__`.

    Raises:
        FileNotFoundError: ``bpe_path`` is ``None`` and no vocabulary file can be found.
    """

    def __init__(
        self, bpe_path: str | os.PathLike[str] | None = None, context_length: int = _DEFAULT_CONTEXT_LENGTH
    ):
        if bpe_path is None:
            bpe_path = find_clip_bpe_vocab()
            if bpe_path is None:
                raise FileNotFoundError(
                    f"Could not find CLIP's BPE vocabulary ({_CLIP_BPE_FILENAME}): {_INSTALL_HINT}."
                )
        elif not os.path.isfile(bpe_path):
            raise FileNotFoundError(f"bpe_path={os.fspath(bpe_path)!r} does not exist: {_INSTALL_HINT}.")
        merges = _read_clip_merges(bpe_path)
        byte_symbols = list(_bytes_to_unicode().values())
        vocab = byte_symbols + [s + _EOW for s in byte_symbols] + ["".join(m) for m in merges] + [_SOT, _EOT]
        self._setup({tok: i for i, tok in enumerate(vocab)}, merges, context_length)
        logger.debug("Loaded CLIP BPE vocabulary from %s", bpe_path)

    @classmethod
    def from_hf_dir(
        cls, path: str | os.PathLike[str], context_length: int = _DEFAULT_CONTEXT_LENGTH
    ) -> ClipTokenizer:
        """Build from a Hugging Face CLIP tokenizer directory (``vocab.json`` + ``merges.txt``).

        Ids come from ``vocab.json``; ``merges.txt`` lines starting with ``#version`` are skipped.

        Raises:
            FileNotFoundError: either file is missing.
            ValueError: the vocabulary lacks ``<|startoftext|>`` or ``<|endoftext|>``.
        """
        vocab_file = os.path.join(path, "vocab.json")
        merges_file = os.path.join(path, "merges.txt")
        if not (os.path.isfile(vocab_file) and os.path.isfile(merges_file)):
            raise FileNotFoundError(
                f"{os.fspath(path)!r} lacks vocab.json or merges.txt: from_hf_dir needs a Hugging Face CLIP "
                "tokenizer directory (e.g. a snapshot of openai/clip-vit-base-patch32)."
            )
        with open(vocab_file, encoding="utf-8") as f:
            encoder: dict[str, int] = json.load(f)
        missing = [t for t in (_SOT, _EOT) if t not in encoder]
        if missing:
            raise ValueError(f"{vocab_file} has no {missing} entries; it is not a CLIP vocabulary.")
        with open(merges_file, encoding="utf-8") as f:
            lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
        merges = [tuple(line.split()) for line in lines]
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{merges_file} must hold one 'a b' merge per line after the '#version' header.")
        self = cls.__new__(cls)
        self._setup(encoder, merges, context_length)  # type: ignore[arg-type]
        return self

    def _setup(self, encoder: dict[str, int], merges: list[tuple[str, str]], context_length: int) -> None:
        self._encoder = encoder
        self._decoder = {i: tok for tok, i in encoder.items()}
        self._bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._sot_id = encoder[_SOT]
        self._eot_id = encoder[_EOT]
        self._text_specials = {_TEXT_SPECIALS[0]: self._sot_id, _TEXT_SPECIALS[1]: self._eot_id}
        # Also a str.translate table for text.encode("utf-8").decode("latin-1"): chr(b) -> symbol of byte b.
        self._byte_encoder = _bytes_to_unicode()
        self._byte_decoder = {ch: b for b, ch in self._byte_encoder.items()}
        self._cache: dict[str, list[int]] = {}
        self._context_length = _check_context_length(context_length)

    def save_hf(self, directory: str | os.PathLike[str]) -> list[str]:
        """Writes this vocabulary as a Hugging Face CLIP tokenizer (vocab.json, merges.txt, tokenizer config).

        ``transformers.CLIPTokenizer`` / ``CLIPProcessor.from_pretrained(directory)`` then give this
        tokenizer's ids, padded with 0 (``"!"``) as mmclip and OpenCLIP pad. Returns the files written.
        """
        from transformers import CLIPTokenizer

        os.makedirs(directory, exist_ok=True)
        vocab_file = os.path.join(directory, "vocab.json")
        merges_file = os.path.join(directory, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(self._encoder, f, ensure_ascii=False)
        ranked = sorted(self._bpe_ranks, key=self._bpe_ranks.__getitem__)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranked))
        hf = CLIPTokenizer(
            vocab_file,
            merges_file,
            pad_token=self._decoder[self.pad_token_id],
            model_max_length=self._context_length,
            split_special_tokens=True,  # "!" (id 0, the pad) inside text is text, as in mmclip
        )
        return list(hf.save_pretrained(os.fspath(directory)))

    @property
    def vocab_size(self) -> int:
        """Number of ids (49408 for CLIP)."""
        return len(self._encoder)

    @property
    def sot_token_id(self) -> int:
        """Id of ``<|startoftext|>`` (49406 for CLIP)."""
        return self._sot_id

    @property
    def eot_token_id(self) -> int:
        """Id of ``<|endoftext|>`` (49407 for CLIP)."""
        return self._eot_id

    @property
    def pad_token_id(self) -> int:
        """Padding id; CLIP pads with 0."""
        return 0

    @property
    def context_length(self) -> int:
        """Default row length of :meth:`__call__`."""
        return self._context_length

    def _bpe_ids(self, symbols: str) -> list[int]:
        """Ids of one byte-mapped pre-token after BPE (lowest-rank pair merged first, everywhere)."""
        cached = self._cache.get(symbols)
        if cached is not None:
            return cached
        word = [*symbols[:-1], symbols[-1] + _EOW]
        ranks = self._bpe_ranks
        while len(word) > 1:
            best_rank, best = None, None
            for pair in pairwise(word):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(word)
            while i < n:
                if i + 1 < n and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self._encoder[s] for s in word]
        if len(self._cache) >= _BPE_CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)), None)
        self._cache[symbols] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""
        ids: list[int] = []
        for piece in _CLIP_PATTERN.findall(_clean(text, "lower")):
            special = self._text_specials.get(piece)
            if special is not None:
                ids.append(special)
                continue
            ids.extend(self._bpe_ids(piece.encode("utf-8").decode("latin-1").translate(self._byte_encoder)))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; start/end tokens and trailing padding are dropped, ``"</w>"`` becomes a space."""
        if isinstance(ids, torch.Tensor) and ids.dim() != 1:
            raise ValueError(f"decode takes one 1-D sequence, got shape {tuple(ids.shape)}; loop over rows.")
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        while ids and ids[-1] == self.pad_token_id:  # a real sequence never ends in id 0 ("!" without </w>)
            ids.pop()
        specials = (self._sot_id, self._eot_id)
        text = "".join(self._decoder[int(i)] for i in ids if int(i) not in specials)
        raw = bytes(self._byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace(_EOW, " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize to a ``(N, context_length)`` LongTensor: ``[sot] + ids + [eot]``, zero-padded.

        Rows that do not fit are truncated to ``context_length`` and their last token set to eot.
        """
        length = _check_context_length(context_length or self._context_length)
        rows = []
        for text in _as_text_list(texts):
            tokens = [self._sot_id, *self.encode(text), self._eot_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = self._eot_id
            rows.append(tokens + [0] * (length - len(tokens)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)


class HFTokenizer:
    """A ``transformers`` tokenizer returning padded, truncated ``(N, context_length)`` LongTensors.

    Args:
        name_or_path: a local tokenizer directory or a Hugging Face hub id.
        context_length: default number of tokens per row.
        clean: text cleaning before tokenization: ``"none"``, ``"whitespace"`` (ftfy, HTML unescape,
            whitespace collapse), ``"lower"`` (the same, then lower-case) or ``"canonicalize"`` (SigLIP's:
            punctuation removed, lower-cased).
        strip_sep_token: replace the tokenizer's sep token by 0 (OpenCLIP's CLIPA models with BERT's tokenizer).
        **kwargs: passed to ``transformers.AutoTokenizer.from_pretrained``.

    Raises:
        ValueError: unknown ``clean`` mode, or the tokenizer has neither a pad nor an eos token.
        OSError: the tokenizer cannot be loaded.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        context_length: int = _DEFAULT_CONTEXT_LENGTH,
        clean: str = "none",
        strip_sep_token: bool = False,
        **kwargs: Any,
    ):
        if clean not in _CLEAN_MODES:
            raise ValueError(f"clean must be one of {_CLEAN_MODES}, got {clean!r}.")
        from transformers import AutoTokenizer

        name = os.fspath(name_or_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        except OSError as err:
            raise OSError(
                f"Could not load a tokenizer from {name!r}: it is neither a local tokenizer directory nor "
                "reachable on the Hugging Face hub. Pass a directory holding tokenizer files "
                "(tokenizer.json or vocab.json + merges.txt), or 'clip' for CLIP's tokenizer."
            ) from err
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(
                    f"Tokenizer {name!r} has no pad or eos token; add one with add_special_tokens."
                )
            logger.info("Tokenizer %s has no pad token; padding with its eos token.", name)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name_or_path = name
        self.clean = clean
        self.strip_sep_token = strip_sep_token
        self._context_length = _check_context_length(context_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        """Padding id."""
        return int(self.tokenizer.pad_token_id)

    @property
    def eot_token_id(self) -> int:
        """End-of-text id: the tokenizer's eos token, else its sep token."""
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.tokenizer.sep_token_id)

    @property
    def sot_token_id(self) -> int | None:
        """Start-of-text id: the tokenizer's bos token, else its cls token (``None`` if neither)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.cls_token_id

    @property
    def context_length(self) -> int:
        """Default row length of :meth:`__call__`."""
        return self._context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize to a ``(N, context_length)`` LongTensor, padded to and truncated at ``context_length``."""
        length = _check_context_length(context_length or self._context_length)
        batch = [_clean(t, self.clean) for t in _as_text_list(texts)]
        out = self.tokenizer(
            batch, return_tensors="pt", padding="max_length", truncation=True, max_length=length
        )
        ids = out["input_ids"].long()
        if self.strip_sep_token and self.tokenizer.sep_token_id is not None:
            ids = ids.masked_fill(ids == self.tokenizer.sep_token_id, 0)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids`` with special tokens and padding skipped."""
        id_list = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        return str(self.tokenizer.decode(id_list, skip_special_tokens=True))


def _checked_captions(captions: Iterable[str], counter: list[int]) -> Iterator[str]:
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(f"captions must be strings, got {type(caption).__name__}: {caption!r}.")
        counter[0] += 1
        yield caption


def train_bpe_tokenizer(
    captions: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike[str],
    min_frequency: int = 2,
    context_length: int = _DEFAULT_CONTEXT_LENGTH,
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer on your captions and save it for ``get_tokenizer(out_dir)``.

    Normalisation is NFC, whitespace collapse and lower-casing; pre-tokenisation uses CLIP's classes
    (contractions, letter runs, single digits, punctuation runs). Word boundaries are marked GPT-2 style,
    with a leading space symbol on every word, rather than CLIP's ``"</w>"`` suffix: with a byte-level
    alphabet the suffix needs a second copy of every byte symbol, which small vocabularies cannot hold,
    and the ``tokenizers`` BPE silently drops symbols missing from the vocabulary. Encoded rows are
    ``<|startoftext|> ... <|endoftext|>`` padded with ``<|pad|>`` (ids 1, 2 and 0).

    Args:
        captions: training texts (any iterable, read once).
        vocab_size: size of the vocabulary, at least 259 (256 byte symbols and 3 special tokens).
        out_dir: directory to save the tokenizer into (created if needed).
        min_frequency: minimum pair count for a merge.
        context_length: context length recorded with the tokenizer and used by the returned wrapper.

    Returns:
        The trained tokenizer, reloaded from ``out_dir`` as an :class:`HFTokenizer`.

    Raises:
        ValueError: ``vocab_size`` below 259, or no captions.
        TypeError: a caption is not a string.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as _HFCoreTokenizer
    from tokenizers import normalizers as norm
    from transformers import PreTrainedTokenizerFast

    specials = [_PAD, _SOT, _EOT]
    min_size = 256 + len(specials)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be at least {min_size} (256 byte symbols + 3 special tokens), got {vocab_size}."
        )
    core = _HFCoreTokenizer(models.BPE())
    # The prepended space makes the first word look like every other word.
    steps = [norm.NFC(), norm.Replace(Regex(r"\s+"), " "), norm.Strip(), norm.Lowercase(), norm.Prepend(" ")]
    core.normalizer = norm.Sequence(steps)
    words = pre_tokenizers.Split(Regex(_TRAIN_WORD_PATTERN), behavior="isolated")
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.pre_tokenizer = pre_tokenizers.Sequence([words, to_bytes])
    core.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = [0]
    core.train_from_iterator(_checked_captions(captions, counter), trainer=trainer)
    if counter[0] == 0:
        raise ValueError("train_bpe_tokenizer got no captions; pass a non-empty iterable of strings.")
    special_ids = [(_SOT, core.token_to_id(_SOT)), (_EOT, core.token_to_id(_EOT))]
    core.post_processor = processors.TemplateProcessing(
        single=f"{_SOT} $A {_EOT}", pair=f"{_SOT} $A {_EOT} $B:1 {_EOT}:1", special_tokens=special_ids
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=_SOT,
        eos_token=_EOT,
        pad_token=_PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=context_length,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(os.fspath(out_dir))
    logger.info("Trained a %d-token BPE on %d captions into %s", core.get_vocab_size(), counter[0], out_dir)
    return HFTokenizer(out_dir, context_length=context_length)


def _is_clip_hf_dir(path: str) -> bool:
    vocab_file = os.path.join(path, "vocab.json")
    if not (os.path.isfile(vocab_file) and os.path.isfile(os.path.join(path, "merges.txt"))):
        return False
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    return isinstance(vocab, dict) and len(vocab) == _CLIP_VOCAB_SIZE and _SOT in vocab


def get_tokenizer(
    name_or_path: str | os.PathLike[str] | dict[str, Any] | None = "clip", context_length: int | None = None
) -> ClipTokenizer | HFTokenizer:
    """Build a tokenizer from a name or a path.

    Args:
        name_or_path: ``"clip"`` or ``None`` for :class:`ClipTokenizer` with the located vocabulary; a
            Hugging Face CLIP tokenizer directory (``vocab.json`` of 49408 entries with
            ``<|startoftext|>``, plus ``merges.txt``) for :meth:`ClipTokenizer.from_hf_dir`; any other
            directory or a hub id for :class:`HFTokenizer`; or ``{"name": directory or hub id, **options}``
            for an :class:`HFTokenizer` with options (``clean``, ``strip_sep_token``), as the named models
            converted from OpenCLIP record them.
        context_length: row length; default 77.

    Returns:
        The tokenizer.
    """
    length = context_length or _DEFAULT_CONTEXT_LENGTH
    if isinstance(name_or_path, dict):
        options = dict(name_or_path)
        return HFTokenizer(options.pop("name"), context_length=length, **options)
    if name_or_path is None or (isinstance(name_or_path, str) and name_or_path.lower() == "clip"):
        return ClipTokenizer(context_length=length)
    path = os.fspath(name_or_path)
    if os.path.isdir(path) and _is_clip_hf_dir(path):
        return ClipTokenizer.from_hf_dir(path, context_length=length)
    return HFTokenizer(path, context_length=length)
