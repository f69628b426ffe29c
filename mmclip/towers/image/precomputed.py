"""An image "tower" whose inputs are image embeddings computed earlier (LiT from cached embeddings).

With ``DualEncoder(image_tower={"name": "precomputed", "dim": D}, image_proj="none", embed_dim=D, ...)``
the image side of the dual encoder is the identity followed by the dual encoder's L2 normalisation, so
only the text side trains. Feed it the rows of an embedding store (``mmclip embed``; read by
:class:`mmclip.embedding.cached.CachedEmbeddingDataModule`): the frozen image tower then costs nothing per step.

It has no parameters: ``lock`` and ``set_grad_checkpointing`` do nothing, and its ``data_config`` is a
placeholder (its inputs are not images; the cached data module ignores it).
"""

from __future__ import annotations

import torch
from torch import nn

from mmclip.outputs import TowerOutput
from mmclip.registry import IMAGE_TOWERS
from mmclip.towers.base import BaseTower, DataConfig

__all__ = ["PrecomputedTower"]


@IMAGE_TOWERS.register("precomputed")
class PrecomputedTower(BaseTower):
    """Passes precomputed (B, dim) image embeddings through as the pooled output.

    Args:
        dim: width of the embeddings (the store's ``meta.json`` ``dim``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer (the embedding width), got {dim!r}")
        self.output_dim = dim
        # Placeholder: the inputs are embeddings, not images; CachedEmbeddingDataModule ignores it.
        self.data_config = DataConfig(image_size=(1, 1), extra={"precomputed_dim": dim})

    def forward(self, x: torch.Tensor) -> TowerOutput:
        """``x``: (B, dim) float embeddings -> ``TowerOutput(pooled=x)`` (no tokens)."""
        if x.ndim != 2 or x.shape[-1] != self.output_dim:
            raise ValueError(
                f"the precomputed image tower takes (B, {self.output_dim}) embeddings, got shape "
                f"{tuple(x.shape)}; feed it an embedding store through "
                "mmclip.embedding.cached.CachedEmbeddingDataModule, not images"
            )
        return TowerOutput(pooled=x)  # (B, D)

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """No layers: nothing to lock."""
        return []

    def lock(self, unlocked_groups: int = 0, freeze_norm: bool = False) -> None:
        """Nothing to freeze (no parameters); ``unlocked_groups`` must be 0."""
        if unlocked_groups != 0:
            raise ValueError("the precomputed image tower has no layer groups: unlocked_groups must be 0")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Nothing to recompute."""

    def extra_repr(self) -> str:
        return f"dim={self.output_dim}"
