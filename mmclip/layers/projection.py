"""Projection heads owned by the dual encoder: linear, MLP, or none."""

from __future__ import annotations

from torch import nn

from mmclip.layers.transformer import get_activation

__all__ = ["Mlp", "build_projection"]


class Mlp(nn.Sequential):
    """fc1 -> activation -> fc2."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        act: str = "gelu",
        bias: bool = True,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        self.add_module("fc1", nn.Linear(in_dim, hidden_dim, bias=bias))
        self.add_module("act", get_activation(act))
        self.add_module("fc2", nn.Linear(hidden_dim, out_dim, bias=out_bias))


def build_projection(
    kind: str, in_dim: int, out_dim: int, bias: bool = False, hidden_dim: int | None = None, act: str = "gelu"
) -> nn.Module:
    """Builds a projection head.

    Args:
        kind: "linear", "mlp" (hidden ``hidden_dim``, default 2 * out_dim) or "none" (identity).
        in_dim: tower output width.
        out_dim: shared embedding width.
        bias: bias on the (last) linear layer.
    """
    if kind == "linear":
        proj = nn.Linear(in_dim, out_dim, bias=bias)
        nn.init.normal_(proj.weight, std=in_dim**-0.5)
        if bias:
            nn.init.zeros_(proj.bias)
        return proj
    if kind == "mlp":
        return Mlp(in_dim, hidden_dim or 2 * out_dim, out_dim, act=act, out_bias=bias)
    if kind == "none":
        if in_dim != out_dim:
            raise ValueError(
                f"projection 'none' needs the tower width ({in_dim}) to equal embed_dim ({out_dim}); "
                "use 'linear' or 'mlp', or set embed_dim to the tower width"
            )
        return nn.Identity()
    raise ValueError(f"unknown projection {kind!r}; use 'linear', 'mlp' or 'none'")
