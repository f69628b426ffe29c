"""CLIP's GPT-2-style text transformer (also the SigLIP variant without causal mask).

token + learned positions -> blocks (causal) -> ln_final -> pool at the first end-of-text token.

With a causal mask, a token can only see tokens before it, so nothing after the pooled position can
change the pooled output. Each batch is therefore trimmed to its longest pooled position before the
blocks: identical outputs, and compute that follows real caption length instead of the context length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmclip.layers.norm import LayerNorm
from mmclip.layers.pooling import build_pooler
from mmclip.layers.transformer import Transformer
from mmclip.outputs import TowerOutput
from mmclip.registry import TEXT_TOWERS
from mmclip.towers.base import BaseTower, check_token_ids, resolve_layer_indices

__all__ = ["ClipTextTransformer"]

_INDEX_POOLS = ("argmax", "eot")


@TEXT_TOWERS.register("clip_text", aliases=("clip_transformer",))
class ClipTextTransformer(BaseTower):
    """CLIP text transformer.

    Args:
        vocab_size: token vocabulary size.
        context_length: maximum sequence length (learned positions).
        width: token width.
        layers: number of blocks.
        heads: attention heads (default width // 64).
        mlp_ratio: MLP hidden width / width.
        act: "gelu", "quick_gelu" (OpenAI weights) or "gelu_tanh" (SigLIP).
        causal: causal self-attention (CLIP) or full attention (SigLIP).
        pool: "argmax" (first position of the largest id: OpenAI, whose end-of-text id is the largest),
            "eot" (first position of ``eot_token_id``), "last", "mean" or "cls".
        eot_token_id: end-of-text id for ``pool="eot"``.
        pad_token_id: padding id, used for the token mask.
        ln_eps: LayerNorm epsilon.
        trim: with a causal mask and end-of-text pooling, drop positions after the last pooled one.
            ``tokens`` and ``mask`` then have the batch's trimmed length, not ``context_length``.

    ``TowerOutput.mask`` marks the tokens up to and including end-of-text for the end-of-text pools, and
    ``ids != pad_token_id`` for the others.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        layers: int = 12,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        causal: bool = True,
        pool: str = "argmax",
        eot_token_id: int = 49407,
        pad_token_id: int = 0,
        ln_eps: float = 1e-5,
        trim: bool = True,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.output_dim = width
        self.causal = causal
        self.pool_type = pool
        self.eot_token_id = eot_token_id
        self.pad_token_id = pad_token_id
        self.trim = trim and causal and pool in _INDEX_POOLS
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads or max(1, width // 64), mlp_ratio, act, ln_eps)
        self.norm_final = LayerNorm(width, eps=ln_eps)
        self.pool = None if pool in _INDEX_POOLS else build_pooler(pool, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.transformer.init_weights()

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        head: list[nn.Module | nn.Parameter] = [self.norm_final]
        if self.pool is not None:
            head.append(self.pool)
        return [[self.token_embed, self.pos_embed], *[[b] for b in self.transformer.blocks], head]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) position each sequence is pooled at, for the end-of-text pools."""
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        return (ids == self.eot_token_id).int().argmax(dim=-1)

    def _embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, L) ids -> (B, L', D) embedded tokens, the (trimmed) ids and the pool index (or None)."""
        if ids.ndim != 2:
            raise ValueError(f"text ids must be (batch, length), got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.context_length:
            raise ValueError(
                f"text of length {ids.shape[1]} exceeds context_length {self.context_length}: tokenize with "
                f"context_length={self.context_length}"
            )
        B = ids.shape[0]
        index = self.pool_index(ids) if self.pool is None else None  # (B,)
        trim = self.trim and index is not None and B > 0 and not torch.compiler.is_compiling()
        if trim or (ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling()):
            # Token ids are checked where reading them is free (CPU) or rides on the trim's host sync (one per
            # batch for (77 - L) / 77 less compute); compiled graphs keep a fixed length and skip both.
            stats = [ids.min(), ids.max()] + ([index.max()] if trim else [])
            low, high, *end = torch.stack(stats).tolist()
            check_token_ids(ids, self.vocab_size, self, (low, high))
            if trim:
                ids = ids[:, : end[0] + 1]
        L = ids.shape[1]
        x = self.token_embed(ids) + self.pos_embed[:L].to(self.token_embed.weight.dtype)  # (B, L, D)
        return x, ids, index

    def _head(self, x: torch.Tensor, ids: torch.Tensor, index: torch.Tensor | None) -> TowerOutput:
        """(B, L, D) block output -> ln_final, pooled vector, tokens and mask."""
        B, L = ids.shape
        x = self.norm_final(x)  # (B, L, D)
        positions = torch.arange(L, device=ids.device)
        if index is not None:
            pooled = x[torch.arange(B, device=x.device), index]  # (B, D)
            mask = positions[None, :] <= index[:, None]  # (B, L) tokens up to end-of-text
        else:
            mask = ids != self.pad_token_id  # (B, L)
            pooled = self.pool(x)  # pad tokens take part in attention, so they do in pooling too
        return TowerOutput(pooled=pooled, tokens=x, mask=mask)

    def forward(self, ids: torch.Tensor) -> TowerOutput:
        x, ids, index = self._embed(ids)
        return self._head(self.transformer(x, causal=self.causal), ids, index)

    def forward_intermediates(
        self, ids: torch.Tensor, indices: Sequence[int]
    ) -> tuple[TowerOutput, list[torch.Tensor]]:
        """The forward output plus the hidden states (B, L', D) after each block in ``indices``.

        Intermediates are the raw residual stream (before ``ln_final``), trimmed like ``tokens``, in the
        order of ``indices`` (negative ones count from the last block). No activation checkpointing.
        """
        take = resolve_layer_indices(indices, len(self.transformer.blocks))
        wanted, kept = set(take), {}
        x, ids, index = self._embed(ids)
        for i, block in enumerate(self.transformer.blocks):
            x = block(x, causal=self.causal)  # (B, L', D)
            if i in wanted:
                kept[i] = x
        return self._head(x, ids, index), [kept[i] for i in take]
