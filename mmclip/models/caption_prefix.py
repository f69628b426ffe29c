"""PrefixCaptioner (ClipCap): image features -> mapping network -> k prefix embeddings -> GPT-2.

Training is teacher forcing on ``concat(prefix, caption)`` with cross-entropy on the caption tokens and
the eos after them (so generation learns to stop); prefix and padding positions carry the label -100.
Padding comes from the attention mask, never from token ids: GPT-2's id 0 is a real token ("!") and its
pad token is usually its eos. Generation runs ``transformers``' ``generate(inputs_embeds=prefix)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.layers.transformer import Transformer
from mmclip.outputs import CaptionOutput
from mmclip.towers.base import fixed_size_data_config

__all__ = [
    "IGNORE_INDEX",
    "CaptionTargets",
    "CaptionTokenizer",
    "MLPMapper",
    "TransformerMapper",
    "PrefixCaptioner",
    "build_caption_labels",
    "build_caption_targets",
    "caption_loss",
]

IGNORE_INDEX = -100
_STRATEGIES = ("greedy", "beam", "nucleus")


# ---- tokenizer ---------------------------------------------------------------------------------
class CaptionTokenizer:
    """One interface over the tokenizers a captioner can use: ``encode``, ``decode``, eos and pad ids.

    Args:
        tokenizer: a local tokenizer directory or hub id (loaded with ``AutoTokenizer``); a
            ``transformers`` tokenizer; an mmclip ``HFTokenizer`` (its ``.tokenizer`` is used); or any
            object with ``encode(text) -> ids`` (or callable as ``tokenizer(text) -> ids``) and, for
            :meth:`decode`, ``decode(ids) -> str``.
        eos_token_id: end-of-sequence id; default the tokenizer's ``eos_token_id`` (or ``eot_token_id``).
        pad_token_id: padding id; default the tokenizer's pad id, else the eos id. Padding is always
            marked by the attention mask too, so pad may equal eos or any real token.

    Raises:
        ValueError: no eos id can be found.
    """

    def __init__(
        self, tokenizer: Any, eos_token_id: int | None = None, pad_token_id: int | None = None
    ) -> None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        from transformers import PreTrainedTokenizerBase

        inner = getattr(tokenizer, "tokenizer", None)
        if not isinstance(tokenizer, PreTrainedTokenizerBase) and isinstance(inner, PreTrainedTokenizerBase):
            tokenizer = inner  # mmclip.tokenizers.HFTokenizer
        self.tokenizer = tokenizer
        self._is_hf = isinstance(tokenizer, PreTrainedTokenizerBase)
        for name in ("eos_token_id", "eot_token_id"):  # HF / mmclip names
            eos_token_id = getattr(tokenizer, name, None) if eos_token_id is None else eos_token_id
        if eos_token_id is None:
            raise ValueError(f"no eos id found on {type(tokenizer).__name__}; pass eos_token_id=...")
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int | None:
        """Number of ids (added tokens included), or None when the tokenizer does not say."""
        return len(self.tokenizer) if self._is_hf else getattr(self.tokenizer, "vocab_size", None)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if self._is_hf:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        encode = getattr(self.tokenizer, "encode", None)
        ids = encode(text) if encode is not None else self.tokenizer(text)
        return [int(i) for i in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped for ``transformers`` tokenizers); needs ``decode``."""
        if self._is_hf:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()
        return str(self.tokenizer.decode(list(ids))).strip()


class CaptionTargets(NamedTuple):
    """Teacher-forcing inputs built by :func:`build_caption_targets`.

    Attributes:
        ids: (N, L) token ids, each caption followed by eos, right-padded with the pad id.
        mask: (N, L) long, 1 on caption tokens and their eos, 0 on padding.
    """

    ids: torch.Tensor
    mask: torch.Tensor


def build_caption_targets(
    tokenizer: Any,
    captions: Sequence[str],
    max_length: int = 40,
    pad_to_max_length: bool = False,
) -> CaptionTargets:
    """Tokenizes captions for :meth:`PrefixCaptioner.forward`: ids + eos, right padding, and a mask.

    A caption whose tokens plus eos exceed ``max_length`` is cut to ``max_length`` tokens and gets no eos
    (the model is not taught to stop in the middle of a sentence); choose ``max_length`` so that captions
    fit.

    Args:
        tokenizer: anything :class:`CaptionTokenizer` accepts.
        captions: N caption strings.
        max_length: most tokens per row, eos included.
        pad_to_max_length: pad every row to ``max_length`` instead of to the longest row.

    Returns:
        ``CaptionTargets(ids (N, L), mask (N, L))``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, not one string")
    tok = tokenizer if isinstance(tokenizer, CaptionTokenizer) else CaptionTokenizer(tokenizer)
    rows = [(tok.encode(caption) + [tok.eos_token_id])[:max_length] for caption in captions]
    length = max_length if pad_to_max_length else max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)  # (N, L)
    mask = torch.zeros((len(rows), length), dtype=torch.long)  # (N, L)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return CaptionTargets(ids=ids, mask=mask)


def build_caption_labels(
    caption_ids: torch.Tensor, caption_mask: torch.Tensor, prefix_length: int
) -> torch.Tensor:
    """Labels aligned with ``concat(prefix, caption)``: -100 at the prefix and at padding.

    Args:
        caption_ids: (B, L) token ids.
        caption_mask: (B, L) 1/True on real tokens (eos included), 0/False on padding.
        prefix_length: k, the number of prefix positions in front of the caption.

    Returns:
        (B, k + L) long labels; position t is predicted by the logits at position t - 1.
    """
    labels = caption_ids.masked_fill(~caption_mask.bool(), IGNORE_INDEX)  # (B, L)
    prefix = labels.new_full((labels.shape[0], prefix_length), IGNORE_INDEX)  # (B, k)
    return torch.cat([prefix, labels], dim=1)  # (B, k + L)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100 (computed in fp32).

    Args:
        logits: (B, T, V) logits; position t predicts token t + 1.
        labels: (B, T) labels as from :func:`build_caption_labels`.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


# ---- mapping networks --------------------------------------------------------------------------
class MLPMapper(nn.Module):
    """ClipCap's MLP mapper: Linear(D, h) -> Tanh -> Linear(h, k * E), reshaped to (B, k, E).

    Args:
        in_dim: D, the image feature width.
        lm_dim: E, the language model's embedding width.
        prefix_length: k.
        hidden_dim: h; default ``E * k // 2`` (ClipCap).
    """

    def __init__(self, in_dim: int, lm_dim: int, prefix_length: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or max(1, lm_dim * prefix_length // 2)
        self.prefix_length = prefix_length
        self.lm_dim = lm_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, lm_dim * prefix_length)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.prefix_length, self.lm_dim)  # (B, k, E)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper with k learned constant tokens.

    Pooled features (B, D) are projected to ``clip_length`` tokens ``Linear(D, clip_length * E)``; patch
    tokens (B, N, D) are projected one by one ``Linear(D, E)``. The k learned constants are appended, a
    pre-LN transformer encoder (no causal mask, MLP ratio 2, ReLU, as ClipCap) mixes them, and the
    outputs at the constant positions are the prefix.

    Args:
        in_dim: D, the image feature (or token) width.
        lm_dim: E, the language model's embedding width (divisible by ``heads``).
        prefix_length: k, number of learned constants = prefix tokens.
        clip_length: tokens the pooled feature is projected to; default k. Unused for patch tokens.
        layers: transformer depth.
        heads: attention heads.
        tokens_input: the input is patch tokens (B, N, D) rather than a pooled vector (B, D).
    """

    def __init__(
        self,
        in_dim: int,
        lm_dim: int,
        prefix_length: int,
        clip_length: int | None = None,
        layers: int = 8,
        heads: int = 8,
        tokens_input: bool = False,
    ) -> None:
        super().__init__()
        self.prefix_length = prefix_length
        self.clip_length = clip_length or prefix_length
        self.lm_dim = lm_dim
        self.tokens_input = tokens_input
        out = lm_dim if tokens_input else self.clip_length * lm_dim
        self.proj = nn.Linear(in_dim, out)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, lm_dim))  # (k, E)
        self.transformer = Transformer(lm_dim, layers, heads, mlp_ratio=2.0, act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != (3 if self.tokens_input else 2):
            raise ValueError(f"unexpected feature shape {tuple(x.shape)} (tokens_input={self.tokens_input})")
        B = x.shape[0]
        if self.tokens_input:
            x = self.proj(x)  # (B, N, E)
        else:
            x = self.proj(x).view(B, self.clip_length, self.lm_dim)  # (B, c, E)
        const = self.prefix_const.to(x.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, k, E)
        x = self.transformer(torch.cat([x, const], dim=1))  # (B, N + k, E)
        return x[:, -self.prefix_length :]  # (B, k, E)


# ---- image features ----------------------------------------------------------------------------
class _ImageFeatures(nn.Module):
    """The image side: a tower (pooled or patch tokens), or a DualEncoder's projected image embedding."""

    def __init__(self, encoder: nn.Module, features: str, normalize: bool) -> None:
        super().__init__()
        if features not in ("pooled", "tokens"):
            raise ValueError(f"features must be 'pooled' or 'tokens', got {features!r}")
        self.features = features
        self.normalize = normalize
        if hasattr(encoder, "image_tower"):  # a DualEncoder: keep only the image side
            self.tower = encoder.image_tower
            self.proj = encoder.image_proj if features == "pooled" else None
            pooled_dim = int(encoder.embed_dim)
        elif hasattr(encoder, "output_dim"):
            self.tower = encoder
            self.proj = None
            pooled_dim = int(encoder.output_dim)
        else:
            raise TypeError(f"need an image tower or a DualEncoder, got {type(encoder).__name__}")
        self.out_dim = pooled_dim if features == "pooled" else self._token_dim()

    @property
    def data_config(self) -> Any:
        return fixed_size_data_config(getattr(self.tower, "data_config", None))  # square tensors, stacked

    def _token_dim(self) -> int:
        size = getattr(self.data_config, "image_size", (224, 224))
        param = next(self.tower.parameters())
        was_training = self.tower.training
        self.tower.eval()
        with torch.no_grad():
            out = self.tower(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype))
        self.tower.train(was_training)
        if out.tokens is None:
            raise ValueError(f"{type(self.tower).__name__} returns no patch tokens; use features='pooled'")
        return int(out.tokens.shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.tower(images)
        if self.features == "tokens":
            x = out.tokens  # (B, N, D)
        else:
            x = out.pooled if self.proj is None else self.proj(out.pooled)  # (B, D)
        return F.normalize(x, dim=-1) if self.normalize else x


def _build_image_encoder(encoder: nn.Module | str | dict[str, Any], pretrained: str | None) -> nn.Module:
    if isinstance(encoder, nn.Module):
        if pretrained is not None:
            raise ValueError("image_pretrained only applies when image_encoder is a name or a spec")
        return encoder
    if isinstance(encoder, str) or "image_tower" in encoder:  # any model source, or a DualEncoder config
        from mmclip.models.factory import create_model

        return create_model(encoder if isinstance(encoder, str) else dict(encoder), pretrained=pretrained)
    if isinstance(encoder, dict) or hasattr(encoder, "items"):
        spec = dict(encoder)
        if pretrained is not None:
            raise ValueError("image_pretrained needs a model name or a DualEncoder spec, not a tower spec")
        import mmclip.towers  # noqa: F401  (registers the built-in towers)
        from mmclip.registry import IMAGE_TOWERS

        return IMAGE_TOWERS.build(spec)
    raise TypeError(
        f"image_encoder must be a module, a model name or a spec dict, not {type(encoder).__name__}"
    )


def _build_lm(lm: str | os.PathLike[str] | dict[str, Any] | nn.Module, tok: CaptionTokenizer) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    if isinstance(lm, nn.Module):
        return lm
    if isinstance(lm, (str, os.PathLike)):
        return GPT2LMHeadModel.from_pretrained(os.fspath(lm))
    if isinstance(lm, dict) or hasattr(lm, "items"):
        cfg = dict(lm)
        if "vocab_size" not in cfg and tok.vocab_size is None:
            raise ValueError("an LM config without vocab_size needs a tokenizer that knows its size")
        cfg.setdefault("vocab_size", tok.vocab_size)
        cfg.setdefault("eos_token_id", tok.eos_token_id)
        cfg.setdefault("bos_token_id", tok.eos_token_id)
        cfg.setdefault("pad_token_id", tok.pad_token_id)
        return GPT2LMHeadModel(GPT2Config(**cfg))
    raise TypeError(
        f"lm must be a hub id, a directory, a GPT2Config dict or a module, not {type(lm).__name__}"
    )


# ---- the model ---------------------------------------------------------------------------------
class PrefixCaptioner(nn.Module):
    """ClipCap: an image encoder, a mapping network to k prefix embeddings, and GPT-2.

    Example::

        model = PrefixCaptioner("ViT-B-32", lm="gpt2", image_pretrained="ViT-B-32.pt")
        ids, mask = build_caption_targets(model.tokenizer, captions, max_length=40)
        out = model(images, ids, mask)           # CaptionOutput(loss, logits (B, k + L, V))
        model.generate(images, strategy="beam")  # list[str]

    Args:
        image_encoder: an image tower, a DualEncoder (its projected image embedding is used), a model name
            for ``create_model``, a DualEncoder config dict, or an image tower spec ``{"name": ...}``.
        lm: a GPT-2 hub id or local directory (``from_pretrained``), a ``GPT2Config`` dict (random init;
            ``vocab_size`` defaults to the tokenizer's), or a ``GPT2LMHeadModel``.
        tokenizer: anything :class:`CaptionTokenizer` accepts; default (None): loaded from ``lm`` when it is
            a name or directory.
        mapper: ``"mlp"`` or ``"transformer"``.
        prefix_length: k, number of prefix embeddings.
        features: ``"pooled"`` (one vector per image) or ``"tokens"`` (patch tokens; transformer mapper).
        freeze_image: freeze the image encoder (eval mode, no gradients) -- ClipCap's setting.
        freeze_lm: freeze GPT-2 (eval mode, no parameter gradients; gradients reach the mapper through it).
        normalize_features: L2-normalise the image features before the mapper.
        mapper_hidden: hidden width of the MLP mapper (default ``lm_dim * k // 2``).
        mapper_layers, mapper_heads: transformer mapper depth and heads (ClipCap: 8, 8).
        clip_length: transformer mapper: tokens the pooled feature is projected to (default k).
        image_pretrained: weights for a named / DualEncoder-spec ``image_encoder`` (see ``create_model``).
        eos_token_id: override the tokenizer's eos id.
        pad_token_id: override the tokenizer's pad id (default pad, else eos).
    """

    def __init__(
        self,
        image_encoder: nn.Module | str | dict[str, Any],
        lm: str | os.PathLike[str] | dict[str, Any] | nn.Module = "gpt2",
        tokenizer: Any = None,
        mapper: str = "mlp",
        prefix_length: int = 10,
        features: str = "pooled",
        freeze_image: bool = True,
        freeze_lm: bool = False,
        normalize_features: bool = False,
        mapper_hidden: int | None = None,
        mapper_layers: int = 8,
        mapper_heads: int = 8,
        clip_length: int | None = None,
        image_pretrained: str | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if prefix_length < 1:
            raise ValueError(f"prefix_length must be >= 1, got {prefix_length}")
        if tokenizer is None:
            if not isinstance(lm, (str, os.PathLike)):
                raise ValueError("pass a tokenizer (it is loaded from lm only for a name or directory)")
            tokenizer = lm
        self.tokenizer = CaptionTokenizer(tokenizer, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        self.image_encoder = _ImageFeatures(
            _build_image_encoder(image_encoder, image_pretrained), features, normalize_features
        )
        self.lm = _build_lm(lm, self.tokenizer)
        self.lm_dim = int(self.lm.get_input_embeddings().embedding_dim)
        vocab = self.tokenizer.vocab_size
        lm_vocab = self.lm.get_input_embeddings().num_embeddings
        if vocab is not None and vocab > lm_vocab:
            raise ValueError(f"the tokenizer has {vocab} ids but the language model only {lm_vocab}")
        self.prefix_length = prefix_length
        in_dim = self.image_encoder.out_dim
        if mapper == "mlp":
            if features == "tokens":
                raise ValueError("the MLP mapper takes pooled features; use mapper='transformer' for tokens")
            self.mapper: nn.Module = MLPMapper(in_dim, self.lm_dim, prefix_length, mapper_hidden)
        elif mapper == "transformer":
            self.mapper = TransformerMapper(
                in_dim,
                self.lm_dim,
                prefix_length,
                clip_length=clip_length,
                layers=mapper_layers,
                heads=mapper_heads,
                tokens_input=features == "tokens",
            )
        else:
            raise ValueError(f"unknown mapper {mapper!r}; known: 'mlp', 'transformer'")
        self.freeze_image = freeze_image
        self.freeze_lm = freeze_lm
        if freeze_image:
            self.image_encoder.requires_grad_(False)
        if freeze_lm:
            self.lm.requires_grad_(False)
        self.train(self.training)

    @property
    def data_config(self) -> Any:
        """The image tower's preprocessing description."""
        return self.image_encoder.data_config

    def train(self, mode: bool = True) -> PrefixCaptioner:
        """Sets training mode; frozen parts always stay in eval mode (no dropout, fixed norm statistics)."""
        super().train(mode)
        if self.freeze_image:
            self.image_encoder.eval()
        if self.freeze_lm:
            self.lm.eval()
        return self

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, D) pooled features or (B, N, D) patch tokens (no grad when frozen)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_image):
            return self.image_encoder(images)

    def encode_prefix(
        self, images: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images, or precomputed features from :meth:`encode_features`, -> (B, k, E) prefix embeddings."""
        if features is None and images is None:
            raise ValueError("pass images or features")
        features = self.encode_features(images) if features is None else features
        prefix = self.mapper(features)  # (B, k, E)
        return prefix.to(self.lm.get_input_embeddings().weight.dtype)

    def forward(
        self,
        images: torch.Tensor | None,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> CaptionOutput:
        """Teacher-forced language-model loss on the captions.

        Args:
            images: (B, 3, H, W), or None when ``features`` are given.
            caption_ids: (B, L) caption ids followed by eos, right-padded (:func:`build_caption_targets`).
            caption_mask: (B, L) 1 on caption tokens and eos, 0 on padding. None: every token is real.
            features: precomputed image features instead of ``images``.

        Returns:
            ``CaptionOutput(loss, logits)`` with logits (B, k + L, V) over ``concat(prefix, caption)``;
            position t predicts token t + 1. The loss is the mean cross-entropy over the caption tokens
            (first token through eos); prefix and padding positions are ignored.
        """
        if caption_mask is None:
            caption_mask = torch.ones_like(caption_ids)
        prefix = self.encode_prefix(images, features)  # (B, k, E)
        if caption_mask.shape != caption_ids.shape or prefix.shape[0] != caption_ids.shape[0]:
            raise ValueError(
                f"{prefix.shape[0]} images, caption_ids {tuple(caption_ids.shape)}, mask {tuple(caption_mask.shape)}"
            )
        tokens = self.lm.get_input_embeddings()(caption_ids)  # (B, L, E)
        embeds = torch.cat([prefix, tokens], dim=1)  # (B, k + L, E)
        mask = caption_mask.long()
        attention_mask = torch.cat([mask.new_ones(mask.shape[0], self.prefix_length), mask], dim=1)
        logits = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
        labels = build_caption_labels(caption_ids, caption_mask, self.prefix_length)  # (B, k + L)
        return CaptionOutput(loss=caption_loss(logits, labels), logits=logits)

    @torch.no_grad()
    def generate_ids(
        self,
        images: torch.Tensor | None = None,
        strategy: str = "greedy",
        max_new_tokens: int = 30,
        num_beams: int = 5,
        top_p: float = 0.8,
        temperature: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        features: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Generated token ids per image, cut before the first eos / stop token (which is not included).

        Args:
            images: (B, 3, H, W), or None when ``features`` are given.
            strategy: ``"greedy"``, ``"beam"`` (``num_beams``) or ``"nucleus"`` (``top_p``,
                ``temperature``; sampling uses torch's global RNG, seed it for reproducibility).
            max_new_tokens: most tokens per caption.
            num_beams: beam width for ``"beam"``.
            top_p: nucleus mass for ``"nucleus"``.
            temperature: softmax temperature for ``"nucleus"``.
            stop_token_ids: extra ids that end a caption (eos always does).
            features: precomputed image features instead of ``images``.
        """
        from transformers import GenerationConfig

        if strategy not in _STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(_STRATEGIES)}")
        n_positions = getattr(self.lm.config, "n_positions", None)
        if n_positions is not None and self.prefix_length + max_new_tokens > n_positions:
            raise ValueError(
                f"prefix_length {self.prefix_length} + max_new_tokens {max_new_tokens} exceeds the "
                f"language model's {n_positions} positions"
            )
        stops = [self.eos_token_id, *(int(t) for t in (stop_token_ids or ()) if int(t) != self.eos_token_id)]
        options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        options.update(eos_token_id=stops, pad_token_id=self.pad_token_id)
        if strategy == "beam":
            options["num_beams"] = num_beams
        elif strategy == "nucleus":
            options.update(do_sample=True, top_p=top_p, temperature=temperature, top_k=0)
        was_training = self.training
        self.eval()
        try:
            prefix = self.encode_prefix(images, features)  # (B, k, E)
            attention_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)  # (B, k)
            config = GenerationConfig(**options)
            out = self.lm.generate(
                inputs_embeds=prefix, attention_mask=attention_mask, generation_config=config
            )
        finally:
            self.train(was_training)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences  # (B, <= max_new_tokens)
        stop_set, results = set(stops), []
        for row in sequences.tolist():
            cut = next((j for j, token in enumerate(row) if token in stop_set), len(row))
            results.append(row[: min(cut, max_new_tokens)])
        return results

    def generate(
        self,
        images: torch.Tensor | None = None,
        strategy: str = "greedy",
        max_new_tokens: int = 30,
        num_beams: int = 5,
        top_p: float = 0.8,
        temperature: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        features: torch.Tensor | None = None,
    ) -> list[str]:
        """Captions for a batch of images (see :meth:`generate_ids` for the arguments)."""
        args = (strategy, max_new_tokens, num_beams, top_p, temperature, stop_token_ids, features)
        ids = self.generate_ids(images, *args)
        return [self.tokenizer.decode(row) for row in ids]
