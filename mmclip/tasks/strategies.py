"""Strategy builders that need Python objects a YAML file cannot name (FSDP wrap policy)."""

from __future__ import annotations

from typing import Any

__all__ = ["fsdp_strategy"]


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", **kwargs: Any) -> Any:
    """Lightning's FSDPStrategy wrapping every mmclip transformer block (and timm / HF blocks via kwargs).

    Args:
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD`` or ``NO_SHARD``.
        **kwargs: passed to ``FSDPStrategy`` (e.g. ``activation_checkpointing_policy``).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    from mmclip.layers.transformer import TransformerBlock

    kwargs.setdefault("auto_wrap_policy", {TransformerBlock})
    return FSDPStrategy(sharding_strategy=sharding_strategy, **kwargs)
