"""A Flamingo-style vision-language model: a frozen image tower and a frozen language model joined by a few
trained parameters.

    images -> frozen image tower (Featurizer, tokens) -> PerceiverResampler -> visual latents
    text   -> frozen causal LM, a GatedCrossAttentionBlock before every N-th decoder block

The language model is any ``transformers`` causal LM whose decoder blocks sit in a known list
(``transformer.h``: GPT-2 and its kin; ``model.layers``: Llama, Mistral, Qwen, Gemma; ``model.decoder.layers``:
OPT; ``gpt_neox.layers``). Its blocks are wrapped, not copied: each wrapper runs its gated block on the
hidden states and then the LM's own block with the LM's own arguments, so caching, masks and positions stay
the LM's. Two tokens are added to the tokenizer, an image marker and an end-of-chunk token; their input
embeddings (tied to their output rows, as GPT-2 ties its head) are the only trainable part of the LM side.

What trains: the resampler, the gated blocks and the two new token embeddings (``model.parameters()`` holds
exactly these). The image tower and the LM are held outside the module tree (``FrozenModule``): frozen, in eval
mode, checked unchanged by fingerprint, and not saved in checkpoints (rebuild them from their source).

Interleaved text reads: ``<image>question ... answer: red<|endofchunk|><image>...``. Each text token attends to
the latents of the most recent ``<image>`` at or before it (Flamingo's media masking); text before any image
is the LM's own computation. With every gate at 0 (their initial value) the model's logits equal the frozen
LM's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmclip.layers.gated_xattn import GatedCrossAttentionBlock, media_index
from mmclip.layers.perceiver import PerceiverResampler
from mmclip.models.featurizer import Featurizer, FrozenModule

__all__ = ["MEDIA_TOKEN", "CHUNK_TOKEN", "FrozenLM", "VisionLanguageModel", "decoder_blocks"]

MEDIA_TOKEN = "<image>"
CHUNK_TOKEN = "<|endofchunk|>"
_BLOCK_PATHS = ("transformer.h", "model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.layers")


def decoder_blocks(lm: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a ``transformers`` causal LM.

    Raises:
        TypeError: none of the known paths holds a ``ModuleList`` (the paths are listed).
    """
    for path in _BLOCK_PATHS:
        module: Any = lm
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise TypeError(
        f"cannot find the decoder blocks of {type(lm).__name__}: looked for a ModuleList at {list(_BLOCK_PATHS)}"
    )


@dataclass
class _Conditioning:
    """What the wrapped blocks read during one LM call: the latents and each token's image."""

    media: torch.Tensor | None = None  # (B, T, n, D)
    index: torch.Tensor | None = None  # (B, L) image of each token of this call (0: none)
    last: torch.Tensor | None = None  # (B,) image of the last token so far (continues under a KV cache)


class _GatedLayer(nn.Module):
    """A decoder block preceded by a gated cross-attention block (which is registered elsewhere: the
    :class:`VisionLanguageModel`, so the LM's own tensors stay the frozen ones)."""

    def __init__(self, block: nn.Module, gated: GatedCrossAttentionBlock, state: _Conditioning) -> None:
        super().__init__()
        self.block = block
        self.__dict__["gated"] = gated
        self.__dict__["state"] = state

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if state.media is not None and state.index is not None:
            hidden_states = self.gated(hidden_states, state.media, state.index)
        return self.block(hidden_states, *args, **kwargs)


class _ExtendedEmbedding(nn.Module):
    """The LM's input embedding with ``new.num_embeddings`` trainable rows appended after its ``base`` rows."""

    def __init__(self, base: nn.Embedding, new: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.__dict__["new"] = new
        self.num_base = base.num_embeddings
        self.num_embeddings = base.num_embeddings + new.num_embeddings
        self.embedding_dim = base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:  # what code that reads ``get_input_embeddings().weight`` expects
        return torch.cat([self.base.weight, self.new.weight.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.num_base
        out = self.base(ids.masked_fill(is_new, 0))  # (..., D)
        added = self.new((ids - self.num_base).clamp(min=0)).to(out.dtype)  # no host read of is_new
        return torch.where(is_new.unsqueeze(-1), added, out)


class _ExtendedHead(nn.Module):
    """The LM's output head with logits for the new tokens appended (their rows are the new embeddings)."""

    def __init__(self, base: nn.Module, new: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.__dict__["new"] = new

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)  # (..., V)
        added = hidden @ self.new.weight.to(hidden.dtype).T  # (..., K)
        return torch.cat([logits, added.to(logits.dtype)], dim=-1)


class FrozenLM(FrozenModule):
    """A causal language model, frozen and held outside the module tree (see ``FrozenModule``)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.hold(lm, "language model")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.frozen(*args, **kwargs)


class VisionLanguageModel(nn.Module):
    """Frozen image tower + perceiver resampler + frozen causal LM with gated cross-attention.

    Example::

        lm = transformers.GPT2LMHeadModel.from_pretrained("gpt2")
        tokenizer = transformers.AutoTokenizer.from_pretrained("gpt2")
        image = mmclip.create_model("ViT-B-16", pretrained="ViT-B-16.pt")   # or any image tower
        vlm = VisionLanguageModel(image, lm, tokenizer, cross_attn_every=4)
        logits = vlm(ids, images)                     # ids with <image> markers, images (B, T, 3, H, W)

    Args:
        image_encoder: an image tower or a ``DualEncoder`` (its image tower is used), frozen in place.
        lm: a ``transformers`` causal LM, frozen in place (:func:`decoder_blocks` finds its blocks).
        tokenizer: the LM's ``transformers`` tokenizer; :data:`MEDIA_TOKEN` and :data:`CHUNK_TOKEN` are added to
            it, right after the LM's vocabulary.
        cross_attn_every: a gated block before every N-th decoder block (the first one included).
        resampler: ``PerceiverResampler`` settings (``depth``, ``num_latents``, ``heads``, ``dim_head``,
            ``ff_mult``); default 2 blocks of 16 latents.
        cross_attn: ``GatedCrossAttentionBlock`` settings (``heads``, ``dim_head``, ``ff_mult``).
        image_layer: the image tower block whose tokens are read (e.g. -2), instead of its final tokens.

    Raises:
        ValueError: the tokenizer's vocabulary does not end where the LM's embedding table does.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        lm: nn.Module,
        tokenizer: Any,
        cross_attn_every: int = 1,
        resampler: dict[str, Any] | None = None,
        cross_attn: dict[str, Any] | None = None,
        image_layer: int | None = None,
    ) -> None:
        super().__init__()
        if cross_attn_every < 1:
            raise ValueError(f"cross_attn_every must be >= 1, got {cross_attn_every}")
        layers = [image_layer] if image_layer is not None else None
        self.featurizer = Featurizer(image_encoder, output="tokens", layers=layers, modality="image")
        media_dim = self.featurizer.token_dim if image_layer is None else self._layer_dim()
        self.resampler = PerceiverResampler(
            media_dim, **{"depth": 2, "num_latents": 16, "heads": 4, "dim_head": 32, **(resampler or {})}
        )
        self.tokenizer = tokenizer
        self.media_token_id, self.chunk_token_id = self._add_tokens(tokenizer, lm)
        base = lm.get_input_embeddings()
        dim = base.embedding_dim
        self.new_token_embed = nn.Embedding(2, dim)
        with torch.no_grad():  # start where the LM's own embeddings live
            self.new_token_embed.weight.normal_(0.0, float(base.weight.float().std()))
        lm.set_input_embeddings(_ExtendedEmbedding(base, self.new_token_embed))
        lm.set_output_embeddings(_ExtendedHead(lm.get_output_embeddings(), self.new_token_embed))
        self._state = _Conditioning()
        blocks = decoder_blocks(lm)
        self.cross_attn = nn.ModuleList()
        for i in range(0, len(blocks), cross_attn_every):
            gated = GatedCrossAttentionBlock(dim, media_dim, **(cross_attn or {}))
            self.cross_attn.append(gated)
            blocks[i] = _GatedLayer(blocks[i], gated, self._state)
        lm.register_forward_pre_hook(self._index_tokens, with_kwargs=True)
        self.lm = FrozenLM(lm)
        self.cross_attn_every = cross_attn_every

    def _layer_dim(self) -> int:
        """Width of the chosen image block's tokens (one probe forward: block widths differ in convnets)."""
        size = self.featurizer.data_config.image_size
        size = size if isinstance(size, Sequence) else (size, size)
        probe = torch.zeros(1, 3, *size, device=self.featurizer.fingerprint.device)
        return int(self.featurizer(probe).layers[0].shape[-1])

    @staticmethod
    def _add_tokens(tokenizer: Any, lm: nn.Module) -> tuple[int, int]:
        vocab = lm.get_input_embeddings().num_embeddings
        if len(tokenizer) != vocab and MEDIA_TOKEN not in tokenizer.get_vocab():
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the language model embeds {vocab}: the image and "
                "end-of-chunk tokens must come right after the LM's vocabulary; use the LM's own tokenizer"
            )
        tokenizer.add_special_tokens({"additional_special_tokens": [MEDIA_TOKEN, CHUNK_TOKEN]})
        ids = tokenizer.convert_tokens_to_ids([MEDIA_TOKEN, CHUNK_TOKEN])
        if ids != [vocab, vocab + 1]:
            raise ValueError(f"{MEDIA_TOKEN} / {CHUNK_TOKEN} got ids {ids}, expected {[vocab, vocab + 1]}")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return vocab, vocab + 1

    # ---- conditioning ------------------------------------------------------------------------------
    def _index_tokens(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Before every LM call: which image each of this call's tokens reads (continuing under a cache)."""
        state = self._state
        if state.media is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("the vision-language model needs input_ids (it finds the images by their marker)")
        cache = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0  # (transformers 5 says cache)
        start = state.last if past and state.last is not None else None
        state.index = media_index(ids, self.media_token_id, start)
        state.last = state.index[:, -1]

    @contextlib.contextmanager
    def conditioned(self, media: torch.Tensor | None) -> Iterator[None]:
        """LM calls inside read ``media`` (B, T, n, D) latents; outside, the LM is itself."""
        self._state.media, self._state.index, self._state.last = media, None, None
        try:
            yield
        finally:
            self._state.media = self._state.index = self._state.last = None

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) images -> (B, T, n, D) visual latents (frozen tower, trained resampler)."""
        B, T = images.shape[:2]
        if T == 0:
            return images.new_zeros(B, 0, self.resampler.num_latents, self.resampler.dim)
        out = self.featurizer(images.flatten(0, 1))
        tokens = out.tokens if out.layers is None else out.layers[0]  # (B T, N, D)
        latents = self.resampler(tokens)  # (B T, 1, n, D)
        return latents.view(B, T, *latents.shape[-2:])

    # ---- forward and generation -------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, images: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, L, V + 2) of interleaved text; ``images`` (B, T, 3, H, W) in the order of the text's
        ``<image>`` markers (None: text only)."""
        media = self.encode_images(images) if images is not None else None
        with self.conditioned(media):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 8,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy continuation (``transformers``' ``generate``; the latents are computed once), stopping at the
        end-of-chunk or end-of-text token. Prompts are left-padded. Returns (B, new) ids."""
        media = self.encode_images(images) if images is not None else None
        eos = [self.chunk_token_id] + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        with self.conditioned(media):
            out = self.lm.frozen.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=use_cache,
                **kwargs,
            )
        return out[:, input_ids.shape[1] :]

    def encode_prompts(self, prompts: Sequence[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Left-padded ids and mask of ``prompts`` (for :meth:`generate`)."""
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def answer(self, prompts: Sequence[str], images: torch.Tensor | None, max_new_tokens: int = 8) -> list[str]:
        """The generated text after each prompt, up to the end of its chunk."""
        device = self.lm.fingerprint.device
        enc = self.encode_prompts(prompts, device)
        new = self.generate(enc["input_ids"], images, enc["attention_mask"], max_new_tokens)
        out = []
        for row in new.tolist():
            stop = [i for i, t in enumerate(row) if t in (self.chunk_token_id, self.tokenizer.eos_token_id)]
            out.append(self.tokenizer.decode(row[: stop[0]] if stop else row, skip_special_tokens=True).strip())
        return out

    def verify_unchanged(self) -> None:
        """Raises ``FrozenWeightsError`` if the frozen image tower or language model changed."""
        self.featurizer.verify_unchanged()
        self.lm.verify_unchanged()
