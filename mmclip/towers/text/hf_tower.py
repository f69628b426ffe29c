"""Any Hugging Face ``transformers`` encoder (BERT, RoBERTa, XLM-R, ...) as a text tower."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmclip.layers.pooling import build_pooler
from mmclip.outputs import TowerOutput
from mmclip.registry import TEXT_TOWERS
from mmclip.towers.base import BaseTower, resolve_layer_indices

__all__ = ["HFTextTower"]


_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer")


@TEXT_TOWERS.register("hf", aliases=("hf_text", "transformers"))
class HFTextTower(BaseTower):
    """A ``transformers`` encoder with a pooler.

    Build it either from a config (random init, offline): ``HFTextTower(config={"model_type": "bert",
    "hidden_size": 128, ...})``, or from a local directory or hub id: ``HFTextTower("bert-base-uncased")``
    (``pretrained=False`` there reads only the config and initialises randomly).

    Args:
        model_name_or_path: local directory or hub id.
        config: keyword arguments for ``transformers.AutoConfig.for_model`` (must include ``model_type``).
        pretrained: load the weights of ``model_name_or_path`` (else random init from its config).
        pool: "cls", "mean" (over real tokens) or "last" (last real token).
        pad_token_id: padding id used to build the attention mask (default: the config's).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        pretrained: bool = True,
        pool: str = "cls",
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if (model_name_or_path is None) == (config is None):
            raise ValueError("HFTextTower needs exactly one of model_name_or_path or config")
        if config is not None:
            if "model_type" not in config:
                raise ValueError(
                    "an HF text tower config needs a 'model_type' key, e.g. {'model_type': 'bert'}"
                )
            cfg_kwargs = {k: v for k, v in config.items() if k != "model_type"}
            hf_config = AutoConfig.for_model(config["model_type"], **cfg_kwargs)
            self.encoder = _without_pooler(AutoModel.from_config, hf_config)
        elif pretrained:
            self.encoder = _without_pooler(AutoModel.from_pretrained, model_name_or_path)
        else:
            self.encoder = _without_pooler(
                AutoModel.from_config, AutoConfig.from_pretrained(model_name_or_path)
            )
        self.encoder.train()  # from_pretrained leaves the model in eval mode (dropout off); modules start in train
        self.config = self.encoder.config
        self.pad_token_id = pad_token_id if pad_token_id is not None else (self.config.pad_token_id or 0)
        self.vocab_size = int(self.config.vocab_size)
        # positions the encoder embeds: RoBERTa-style models number positions from pad_token_id + 1
        positions = getattr(self.config, "max_position_embeddings", None)
        offset = (self.config.pad_token_id or 0) + 1 if self.config.model_type in _OFFSET_POSITIONS else 0
        self.context_length: int | None = None if positions is None else int(positions) - offset
        self.output_dim = int(self.config.hidden_size)
        self.pool_type = pool
        self.pool = build_pooler(pool, self.output_dim)

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        embeddings = getattr(self.encoder, "embeddings", None)
        layers = _find_layers(self.encoder)
        covered = {
            id(p)
            for m in ([embeddings] if embeddings is not None else []) + list(layers)
            for p in m.parameters()
        }
        rest = [p for p in self.encoder.parameters() if id(p) not in covered]
        first: list[nn.Module | nn.Parameter] = [embeddings] if embeddings is not None else []
        groups: list[list[nn.Module | nn.Parameter]] = [first, *[[layer] for layer in layers]]
        if rest or any(True for _ in self.pool.parameters()):
            groups.append([*rest, self.pool])  # e.g. a final norm after the blocks
        else:
            groups[-1].append(self.pool)
        return groups

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
        on = (
            getattr(self.encoder, "activation_checkpointing_enable", None)
            or self.encoder.gradient_checkpointing_enable
        )
        off = (
            getattr(self.encoder, "activation_checkpointing_disable", None)
            or self.encoder.gradient_checkpointing_disable
        )
        if enable:
            on({"use_reentrant": False})
        else:
            off()

    def forward(self, ids: torch.Tensor) -> TowerOutput:
        mask = ids != self.pad_token_id  # (B, L)
        x = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        pooled = self.pool(x, mask=mask)  # (B, D)
        return TowerOutput(pooled=pooled, tokens=x, mask=mask)

    def forward_intermediates(
        self, ids: torch.Tensor, indices: Sequence[int]
    ) -> tuple[TowerOutput, list[torch.Tensor]]:
        """The forward output plus the encoder's hidden states (B, L, D) after each layer in ``indices``.

        Read from ``output_hidden_states`` (the embeddings are not a layer), in the order of ``indices``
        (negative ones count from the last layer).
        """
        mask = ids != self.pad_token_id  # (B, L)
        out = self.encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        hidden = out.hidden_states[1:]  # one (B, L, D) per layer
        take = resolve_layer_indices(indices, len(hidden))
        x = out.last_hidden_state  # (B, L, D)
        output = TowerOutput(pooled=self.pool(x, mask=mask), tokens=x, mask=mask)
        return output, [hidden[i] for i in take]


def _without_pooler(build: Any, source: Any) -> nn.Module:
    """Builds without the model's own pooler head where it has one (it would be an unused parameter)."""
    try:
        return build(source, add_pooling_layer=False)
    except TypeError:
        return build(source)


def _find_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder's list of blocks (``encoder.layer`` in BERT-like models, ``layers`` elsewhere)."""
    for name in ("encoder.layer", "encoder.layers", "layers", "transformer.layer", "h"):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return list(mod)
    return []
