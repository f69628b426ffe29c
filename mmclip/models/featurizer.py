"""Frozen towers as feature extractors for models built on top of them.

``Featurizer`` wraps an image or text tower (or a ``DualEncoder``, taking one of its towers and, on
request, its projection) and keeps it frozen:

- **No gradients.** Every frozen parameter has ``requires_grad=False`` and the forward runs under
  ``torch.no_grad()`` (not ``inference_mode``, whose tensors could not be saved for the backward of a
  trainable head on top).
- **Not in the parent's parameters.** The frozen module is held outside the module tree, so
  ``parent.parameters()``, an optimizer built from them, ``parent.train()``, ``parent.requires_grad_()``
  and ``parent.apply(init_fn)`` never reach it. Device and dtype moves (``parent.to(...)``, ``.cuda()``,
  ``.half()``) are forwarded, and frozen weights left on the CPU follow an accelerator input on the first
  call, for strategies (FSDP) that move only the parameters they see.
- **Eval mode, always.** BatchNorm statistics and dropout stay frozen whatever ``train()`` is called on.
- **Checked unchanged.** A fingerprint of every frozen tensor is recorded at wrap time;
  ``verify_unchanged()`` raises ``FrozenWeightsError`` naming the tensors that changed. The fingerprint
  is the Featurizer's only state-dict entry: the frozen weights are not saved in the parent's checkpoints
  (rebuild them from their pretrained source), and loading a checkpoint whose fingerprint does not match
  the rebuilt weights is an error. Under DDP the frozen weights are not broadcast (load the same
  pretrained weights on every rank) but the fingerprint is, so ``verify_unchanged()`` on each rank also
  catches ranks that hold different frozen weights.

The tower is frozen in place, not copied: a ``DualEncoder`` passed in has that tower frozen too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmclip.models.dual_encoder import DualEncoder
from mmclip.outputs import TowerOutput
from mmclip.towers.base import fixed_size_data_config

__all__ = ["Featurizer", "TextFeaturizer", "FeaturizerOutput", "FrozenModule", "FrozenWeightsError"]

logger = logging.getLogger(__name__)

_OUTPUTS = ("pooled", "tokens", "both")
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_PRIME = 2_147_483_647  # 2**31 - 1
_ROW = 64
_PASS = 1 << 22  # elements per pass, bounding the scratch memory (a multiple of _ROW)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class FrozenWeightsError(RuntimeError):
    """The weights of a frozen tower changed after it was wrapped."""


@dataclass
class FeaturizerOutput:
    """What a ``Featurizer`` returns; fields that were not requested are None.

    Attributes:
        pooled: (B, D) one vector per sample (the tower's pooled output, or the dual encoder's embedding
            with ``project=True``).
        tokens: (B, N, D') per-token features: ViT patch tokens after ``ln_post`` and before the
            projection, the ResNet / timm final feature map as a sequence, text hidden states after the
            final norm.
        mask: (B, N) bool, True for real tokens (all True for images, False at text padding).
        layers: one (B, N_i, D_i) tensor per requested block index, in the requested order.
    """

    pooled: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    layers: list[torch.Tensor] | None = None


class _FrozenEncoder(nn.Module):
    """The tower and the projection applied to its pooled output (identity unless projecting)."""

    def __init__(self, tower: nn.Module, proj: nn.Module | None) -> None:
        super().__init__()
        self.tower = tower
        self.proj = proj if proj is not None else nn.Identity()


def _to_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use a torch.dtype or one of {sorted(_DTYPES)}")
    return _DTYPES[value]


def _tensor_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """An int64 scalar hash of ``t``'s exact values, the same on every device.

    ``h = sum_i (i + 1) * b_i mod p`` over the element bit patterns ``b`` read as integers in logical
    order (so memory format does not matter), ``p = 2**31 - 1``. The weights are distinct and non-zero
    mod ``p``, so changing any one element, or swapping two, changes ``h`` (unless the bit patterns differ
    by a multiple of ``p``). Computed per row of 64 elements with one float64 matmul, which is exact:
    |b| < 2**31, so the row sums ``S = sum_j b_j`` and ``T = sum_j (j + 1) b_j`` stay below 2**53; then
    ``h = sum_r (64 r S_r + T_r) mod p`` in int64.
    """
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    elif flat.is_floating_point() or flat.is_complex():
        flat = flat.view(_INT_VIEW[flat.element_size()])
    device = flat.device
    col = torch.arange(1, _ROW + 1, dtype=torch.float64, device=device)
    row_weights = torch.stack([torch.ones_like(col), col], dim=1)  # (64, 2): S and T
    acc = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, flat.numel(), _PASS):
        part = flat[start : start + _PASS]
        if part.element_size() == 8:
            part = part % _PRIME  # 64-bit patterns into [0, p), so the float64 sums stay exact
        if part.numel() % _ROW:
            part = torch.cat([part, part.new_zeros(-part.numel() % _ROW)])
        sums = (part.view(-1, _ROW).to(torch.float64) @ row_weights).to(torch.int64) % _PRIME  # (R, 2)
        offsets = torch.arange(start, start + part.numel(), _ROW, device=device) % _PRIME  # (R,) = 64 r
        acc = (acc + ((offsets * sums[:, 0] + sums[:, 1]) % _PRIME).sum()) % _PRIME
    return acc


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _select(model: nn.Module, modality: str | None, project: bool) -> tuple[nn.Module, nn.Module | None, str]:
    """(tower, projection or None, modality) from a tower or a DualEncoder."""
    if modality not in (None, "image", "text"):
        raise ValueError(f"modality must be 'image', 'text' or None (detect), got {modality!r}")
    if isinstance(model, DualEncoder):
        modality = modality or "image"
        tower = model.image_tower if modality == "image" else model.text_tower
        proj = (model.image_proj if modality == "image" else model.text_proj) if project else None
        return tower, proj, modality
    if not hasattr(model, "output_dim"):
        raise TypeError(
            f"Featurizer wraps a tower (with output_dim, forward -> TowerOutput) or a DualEncoder, "
            f"got {type(model).__name__}"
        )
    if project:
        raise ValueError("project=True needs a DualEncoder: a bare tower has no projection")
    detected = "image" if hasattr(model, "data_config") else "text"
    if modality is not None and modality != detected:
        raise ValueError(
            f"{type(model).__name__} is a tower of modality {detected!r}, but modality={modality!r} was given"
        )
    return model, None, detected


class FrozenModule(nn.Module):
    """Holds a frozen module outside the module tree (see the module docstring): no gradients, eval mode,
    device and dtype moves forwarded, and a fingerprint of every frozen tensor as the only state-dict entry.
    Subclasses call :meth:`hold` in ``__init__``."""

    frozen: nn.Module  # set by hold(), outside the module tree
    frozen_label: str = "module"

    def hold(self, frozen: nn.Module, label: str) -> None:
        """Freezes ``frozen`` in place and keeps it outside the module tree; ``label`` names it in messages."""
        frozen.requires_grad_(False)
        frozen.eval()
        self.frozen_label = label
        self.__dict__["frozen"] = frozen  # outside the module tree, on purpose (module docstring)
        self.__dict__["_tensor_names"] = [name for name, _ in _named_tensors(frozen)]
        self._update_device()
        self.register_buffer("fingerprint", self._compute_fingerprint())

    def _update_device(self) -> None:
        first = next(self.frozen.parameters(), None)
        self.__dict__["_device"] = first.device if first is not None else None

    def _apply(self, fn: Any, recurse: bool = True) -> FrozenModule:
        """Forwards ``.to()``, ``.cuda()``, ``.half()``... to the frozen module.

        A cast that changes its dtypes re-records the fingerprint; a move alone leaves it valid.
        """
        dtypes = [t.dtype for _, t in _named_tensors(self.frozen)]
        self.frozen._apply(fn, recurse)
        super()._apply(fn, recurse)
        self._update_device()
        if [t.dtype for _, t in _named_tensors(self.frozen)] != dtypes:
            logger.debug("frozen %s cast to a new dtype: fingerprint re-recorded", self.frozen_label)
            self.fingerprint = self._compute_fingerprint().to(self.fingerprint.device)
        return self

    def _follow_device(self, device: torch.device) -> None:
        """Moves frozen weights left on the CPU to their accelerator input (never the other way)."""
        if self._device is None or self._device.type != "cpu" or device.type in ("cpu", "meta"):
            return
        logger.info(
            "moving the frozen %s from %s to %s (its input's device)",
            self.frozen_label,
            self._device,
            device,
        )
        self.frozen.to(device)
        self.fingerprint = self.fingerprint.to(device)
        self._update_device()

    # ---- the guard -------------------------------------------------------------------------------
    def _compute_fingerprint(self) -> torch.Tensor:
        values = [_tensor_fingerprint(t).cpu() for _, t in _named_tensors(self.frozen)]
        fingerprint = torch.stack(values) if values else torch.zeros(0, dtype=torch.int64)  # (K,)
        return fingerprint.to(self._device or "cpu")

    def record_fingerprint(self) -> None:
        """Accepts the current frozen weights as the reference (after loading new weights on purpose)."""
        self.__dict__["_tensor_names"] = [name for name, _ in _named_tensors(self.frozen)]
        self.fingerprint = self._compute_fingerprint()

    def _changed(self, reference: torch.Tensor) -> list[str]:
        names = [name for name, _ in _named_tensors(self.frozen)]
        current = self._compute_fingerprint().cpu()
        if names != self._tensor_names or current.shape != reference.shape:
            return ["<the set of frozen tensors>"]
        differs = (current != reference.cpu()).tolist()
        return [name for name, d in zip(names, differs, strict=True) if d]

    def verify_unchanged(self) -> None:
        """Raises ``FrozenWeightsError`` if any frozen parameter or buffer changed since wrapping.

        One pass over the frozen weights on their device (cheap next to a training step).
        """
        changed = self._changed(self.fingerprint)
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise FrozenWeightsError(
                f"{len(changed)} frozen tensor(s) of the {self.frozen_label} changed since it was "
                f"wrapped: {shown}. Something wrote to them (an optimizer given its parameters, an "
                "in-place init, a load_state_dict on it); rebuild it from the original "
                "weights, or call record_fingerprint() if the change was intended."
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Checks a checkpoint's fingerprint against the frozen weights instead of loading it.

        A mismatch is an error whatever ``strict`` (torch does not pass it down); to load such a
        checkpoint anyway, drop its ``fingerprint`` key and load with ``strict=False``.
        """
        key = prefix + "fingerprint"
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        changed = self._changed(state_dict[key])
        if changed:
            error_msgs.append(
                f"{key}: the frozen {self.frozen_label} weights differ from those the checkpoint was trained "
                f"on ({len(changed)} tensor(s), e.g. {changed[0]}); rebuild it from the same "
                f"pretrained weights and dtype, or drop {key!r} and load with strict=False"
            )

    def train(self, mode: bool = True) -> FrozenModule:
        """Sets the mode of the module's own children; the frozen module stays in eval mode."""
        super().train(mode)
        self.frozen.eval()
        return self


class Featurizer(FrozenModule):
    """A frozen tower returning pooled vectors, token features and intermediate layers.

    Example::

        model = mmclip.create_model("ViT-B-16", pretrained="ViT-B-16.pt")
        featurizer = Featurizer(model, output="tokens", layers=[-2])
        out = featurizer(images)                     # FeaturizerOutput
        out.tokens, out.mask, out.layers[0]          # (B, N, 768), (B, N), (B, N, 768)

    Args:
        model: an image or text tower, or a ``DualEncoder`` (its ``modality`` tower is taken).
        output: "pooled", "tokens" or "both".
        layers: block indices whose outputs to return too (negative count from the end), e.g. ``[-2]``
            for the penultimate block; needs a tower with ``forward_intermediates``. What a block is, and
            the intermediate features, are the tower's: ViT / text blocks give the residual stream
            before the final norm (ViT without the class token), the ResNet and timm convnets their
            stages as (B, H_i * W_i, C_i), HF encoders their ``hidden_states`` without the embeddings.
        modality: "image" or "text"; detected for towers (image towers have ``data_config``), default
            "image" for a ``DualEncoder``.
        project: apply the dual encoder's projection to ``pooled`` (``DualEncoder`` only): with
            ``normalize`` too, ``pooled`` equals ``model.encode_image(x, normalize=True)``. Tokens and
            layers are never projected.
        normalize: L2-normalize ``pooled``.
        autocast_dtype: run the frozen forward under ``torch.autocast`` in this dtype (e.g. "bf16").
        output_dtype: cast the returned features to this dtype (default: leave them as computed, so
            in the autocast dtype for the matmul outputs when ``autocast_dtype`` is set).
        channels_last: run image towers in channels-last memory format (weights converted once).

    The frozen module is reachable as ``featurizer.frozen`` (``.tower``, ``.proj``) but is not a
    registered submodule: see the module docstring.
    """

    frozen: _FrozenEncoder  # set in __init__, outside the module tree

    def __init__(
        self,
        model: nn.Module,
        output: str = "both",
        layers: Sequence[int] | None = None,
        modality: str | None = None,
        project: bool = False,
        normalize: bool = False,
        autocast_dtype: torch.dtype | str | None = None,
        output_dtype: torch.dtype | str | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        tower, proj, modality = _select(model, modality, project)
        if layers is not None:
            if isinstance(layers, int) or not all(isinstance(i, int) for i in layers):
                raise TypeError(f"layers must be a sequence of block indices such as [-2], got {layers!r}")
            if len(layers) == 0:
                raise ValueError("layers must name at least one block index (or be None)")
            if not hasattr(tower, "forward_intermediates"):
                raise TypeError(
                    f"{type(tower).__name__} has no forward_intermediates(x, indices), so layers cannot be "
                    "returned; see mmclip/towers/base.py"
                )
            layers = tuple(layers)
        self.output = output
        self.layers = layers
        self.modality = modality
        self.project = project
        self.normalize = normalize
        self.autocast_dtype = _to_dtype(autocast_dtype)
        self.output_dtype = _to_dtype(output_dtype)
        self.channels_last = channels_last and modality == "image"
        self.output_dim: int = model.embed_dim if project else tower.output_dim
        self.token_dim: int = getattr(tower, "feature_dim", tower.output_dim)

        frozen = _FrozenEncoder(tower, proj)
        if self.channels_last:
            frozen.to(memory_format=torch.channels_last)
        self.hold(frozen, f"{modality} featurizer")

    @classmethod
    def from_pretrained(cls, name: str, pretrained: str | Path | None = None, **kwargs: Any) -> Featurizer:
        """Builds ``create_model(name, pretrained)`` and wraps it (the unused tower is dropped).

        Args:
            name: a name from ``mmclip.list_models()``.
            pretrained: checkpoint file or directory, as for ``create_model``.
            **kwargs: ``Featurizer`` arguments.
        """
        from mmclip.models.factory import create_model

        return cls(create_model(name, pretrained=pretrained), **kwargs)

    # ---- the frozen module -----------------------------------------------------------------------
    @property
    def tower(self) -> nn.Module:
        """The frozen tower."""
        return self.frozen.tower

    @property
    def data_config(self) -> Any:
        """The image tower's preprocessing description (image featurizers only)."""
        if self.modality != "image":
            raise AttributeError("a text featurizer has no data_config")
        return fixed_size_data_config(self.tower.data_config)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> FeaturizerOutput:
        """Features of a batch.

        Args:
            x: (B, 3, H, W) images prepared with ``data_config``, or (B, L) token ids.
        """
        frozen = self.frozen
        if frozen.training or frozen.tower.training:  # someone called .train() on the tower itself
            frozen.eval()
        self._follow_device(x.device)
        if self.channels_last and isinstance(x, torch.Tensor) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        layers: list[torch.Tensor] | None = None
        pooled = None
        with torch.no_grad(), autocast:
            if self.layers is None:
                out: TowerOutput = frozen.tower(x)
            else:
                out, layers = frozen.tower.forward_intermediates(x, self.layers)
            if self.output != "tokens":
                pooled = frozen.proj(out.pooled)  # (B, D)
                if self.normalize:
                    pooled = F.normalize(pooled.float(), dim=-1).to(pooled.dtype)
        tokens = mask = None
        if self.output != "pooled":
            if out.tokens is None:
                raise ValueError(f"{type(frozen.tower).__name__} returns no tokens; use output='pooled'")
            tokens = out.tokens  # (B, N, D')
            mask = out.mask
            if mask is None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, N)
        if self.output_dtype is not None:
            pooled = pooled.to(self.output_dtype) if pooled is not None else None
            tokens = tokens.to(self.output_dtype) if tokens is not None else None
            layers = [t.to(self.output_dtype) for t in layers] if layers is not None else None
        return FeaturizerOutput(pooled=pooled, tokens=tokens, mask=mask, layers=layers)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.frozen.parameters())
        return (
            f"{self.modality}, tower={type(self.tower).__name__} (frozen, {n:,} parameters), "
            f"output={self.output!r}, layers={self.layers}, project={self.project}"
        )


class TextFeaturizer(Featurizer):
    """A ``Featurizer`` of the text tower: per-token hidden states (B, L, D) and their padding mask.

    This is how text-to-image models condition on a frozen CLIP text encoder.

    Example::

        text = TextFeaturizer(model, output="tokens")   # model: a DualEncoder or a text tower
        out = text(tokenizer(["a photo of a cat"]))     # out.tokens (1, L, D), out.mask (1, L)

    Takes ``Featurizer``'s arguments except ``modality``.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if "modality" in kwargs:
            raise TypeError("TextFeaturizer always uses modality='text'")
        super().__init__(model, modality="text", **kwargs)
