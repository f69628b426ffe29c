"""DualEncoder: any image tower + any text tower, projections and temperature owned here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.layers.projection import build_projection
from mmclip.outputs import DualEncoderOutput, TowerOutput
from mmclip.registry import IMAGE_TOWERS, TEXT_TOWERS
from mmclip.towers.base import check_images
from mmclip.towers.image.naflex_vit import NaFlexImages

__all__ = ["DualEncoder"]

CONFIG_NAME = "mmclip_config.json"
WEIGHTS_NAME = "model.safetensors"


def _check_image_batch(images: torch.Tensor, tower: nn.Module) -> None:
    """Channels-last and integer image batches get an error naming the fix, whatever the tower (towers that
    take other inputs, e.g. precomputed (B, D) features, are left to their own checks)."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 4:
            check_images(images, tower)
    elif isinstance(images, NaFlexImages) and not getattr(tower, "takes_naflex", False):
        raise TypeError(
            f"{type(tower).__name__} takes (B, 3, H, W) image tensors, not NaFlexImages: preprocess with "
            "create_model_and_transforms for this model (its preprocess gives tensors that collate_images stacks)"
        )


def _build_tower(tower: nn.Module | dict[str, Any], registry: Any) -> tuple[nn.Module, dict[str, Any] | None]:
    if isinstance(tower, nn.Module):
        return tower, None
    if isinstance(tower, dict) or hasattr(tower, "items"):
        spec = dict(tower)
        return registry.build(spec), spec
    raise TypeError(
        f"a tower must be an nn.Module or a spec dict {{'name': ...}}, got {type(tower).__name__}"
    )


class DualEncoder(nn.Module):
    """Two towers mapped into one normalised embedding space.

    Example::

        model = DualEncoder(
            image_tower={"name": "clip_vit", "image_size": 64, "patch_size": 16, "width": 128, "layers": 2},
            text_tower={"name": "clip_text", "width": 128, "layers": 2},
            embed_dim=64,
        )
        out = model(images, token_ids)          # DualEncoderOutput
        logits = out.logit_scale * out.image_embeds @ out.text_embeds.T

    Args:
        image_tower: a tower module or a spec ``{"name": <IMAGE_TOWERS name>, **kwargs}``.
        text_tower: a tower module or a spec ``{"name": <TEXT_TOWERS name>, **kwargs}``.
        embed_dim: shared embedding width.
        image_proj: "linear", "mlp" or "none" (the tower's output is already the embedding).
        text_proj: same, for the text tower.
        image_proj_bias: bias on the image projection.
        text_proj_bias: bias on the text projection (SigLIP has one).
        init_logit_scale: initial log temperature; ``exp`` of it multiplies the similarities.
        init_logit_bias: initial logit bias (SigLIP: -10), or None for no bias.
        keep_tower_outputs: also return the raw tower outputs in ``DualEncoderOutput``.
    """

    def __init__(
        self,
        image_tower: nn.Module | dict[str, Any],
        text_tower: nn.Module | dict[str, Any],
        embed_dim: int = 512,
        image_proj: str = "linear",
        text_proj: str = "linear",
        image_proj_bias: bool = False,
        text_proj_bias: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
        keep_tower_outputs: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive integer (the shared embedding width), got {embed_dim!r}")
        self.image_tower, image_spec = _build_tower(image_tower, IMAGE_TOWERS)
        self.text_tower, text_spec = _build_tower(text_tower, TEXT_TOWERS)
        self.embed_dim = embed_dim
        self.image_proj = build_projection(
            image_proj, self.image_tower.output_dim, embed_dim, image_proj_bias
        )
        self.text_proj = build_projection(text_proj, self.text_tower.output_dim, embed_dim, text_proj_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        )
        self.keep_tower_outputs = keep_tower_outputs
        # The spec that rebuilds this model (None when a tower was passed as a module).
        self.config: dict[str, Any] | None = None
        if image_spec is not None and text_spec is not None:
            self.config = {
                "image_tower": image_spec,
                "text_tower": text_spec,
                "embed_dim": embed_dim,
                "image_proj": image_proj,
                "text_proj": text_proj,
                "image_proj_bias": image_proj_bias,
                "text_proj_bias": text_proj_bias,
                "init_logit_scale": float(init_logit_scale),
                "init_logit_bias": init_logit_bias,
            }

    def add_logit_bias(self, init_bias: float, init_scale: float | None = None) -> None:
        """Adds a learnable logit bias (for sigmoid losses) to a model built without one; with ``init_scale``
        the log-temperature is reset too. The spec in ``config`` follows, so checkpoints rebuild the model."""
        if self.logit_bias is not None:
            raise ValueError("the model already has a logit_bias")
        device = self.logit_scale.device
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias), device=device))
        if self.config is not None:
            self.config["init_logit_bias"] = float(init_bias)
        if init_scale is not None:
            with torch.no_grad():
                self.logit_scale.fill_(float(init_scale))
            if self.config is not None:
                self.config["init_logit_scale"] = float(init_scale)

    @property
    def data_config(self) -> Any:
        """The image tower's preprocessing description."""
        return self.image_tower.data_config

    def encode_image(self, images: torch.Tensor | Any, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) images (or a NaFlex tower's ``NaFlexImages``; see ``mmclip.collate_images``) -> (B, E)."""
        _check_image_batch(images, self.image_tower)
        x = self.image_proj(self.image_tower(images).pooled)  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids -> (B, E) embeddings."""
        x = self.text_proj(self.text_tower(ids).pooled)  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> DualEncoderOutput:
        """Embeds both modalities; either may be None (its embeddings are then empty (0, E))."""
        image_out: TowerOutput | None = None
        text_out: TowerOutput | None = None
        if images is not None:
            _check_image_batch(images, self.image_tower)
            image_out = self.image_tower(images)
            image_embeds = F.normalize(self.image_proj(image_out.pooled), dim=-1)  # (B, E)
        else:
            image_embeds = self.logit_scale.new_zeros(0, self.embed_dim)
        if text is not None:
            text_out = self.text_tower(text)
            text_embeds = F.normalize(self.text_proj(text_out.pooled), dim=-1)  # (B, E)
        else:
            text_embeds = self.logit_scale.new_zeros(0, self.embed_dim)
        return DualEncoderOutput(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias,
            image_output=image_out if self.keep_tower_outputs else None,
            text_output=text_out if self.keep_tower_outputs else None,
        )

    def lock_image_tower(
        self, unlocked_groups: int = 0, freeze_norm: bool = False, lock_proj: bool = True
    ) -> None:
        """LiT: freeze the image tower but its last ``unlocked_groups`` layer groups, and its projection.

        With ``lock_proj`` (default) the image embedding is fully frozen whatever the tower: ViT and timm
        towers keep their projection in the dual encoder, the modified ResNet and SigLIP's attention-pool
        head inside the tower, and both end up locked alike.
        """
        self.image_tower.lock(unlocked_groups, freeze_norm)
        self.image_proj.requires_grad_(not lock_proj)

    def lock_text_tower(
        self, unlocked_groups: int = 0, freeze_norm: bool = False, lock_proj: bool = True
    ) -> None:
        """Freeze the text tower but its last ``unlocked_groups`` layer groups, and (``lock_proj``) its projection."""
        self.text_tower.lock(unlocked_groups, freeze_norm)
        self.text_proj.requires_grad_(not lock_proj)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_tower.set_grad_checkpointing(enable)
        self.text_tower.set_grad_checkpointing(enable)

    # ---- mmclip's own format -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DualEncoder:
        """Builds a model from ``model.config`` (specs only, as saved by ``save_pretrained``)."""
        known = {
            "image_tower",
            "text_tower",
            "embed_dim",
            "image_proj",
            "text_proj",
            "image_proj_bias",
            "text_proj_bias",
            "init_logit_scale",
            "init_logit_bias",
            "keep_tower_outputs",
        }
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown DualEncoder config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**config)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes ``mmclip_config.json`` and ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        if self.config is None:
            raise ValueError(
                "save_pretrained needs towers built from specs (dicts) so the model can be rebuilt; "
                "for towers passed as modules save model.state_dict() with safetensors yourself"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps({"mmclip": 1, "model": self.config}, indent=2))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        return directory
