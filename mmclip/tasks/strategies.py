"""Strategy builders that need Python objects a YAML file cannot name (FSDP wrap policy)."""

from __future__ import annotations

import functools
import importlib
from typing import Any

from torch import nn

__all__ = ["block_classes", "fsdp_strategy", "lift_scalar_parameters"]

# The repeated blocks of every tower mmclip builds: FSDP shards (and checkpoints activations) one per unit.
_BLOCKS = (
    "mmclip.layers.transformer:TransformerBlock",
    "mmclip.layers.perceiver:PerceiverBlock",
    "timm.models.vision_transformer:Block",
    "timm.models.convnext:ConvNeXtStage",
    "transformers.models.bert.modeling_bert:BertLayer",
    "transformers.models.gpt2.modeling_gpt2:GPT2Block",
    "transformers.models.clip.modeling_clip:CLIPEncoderLayer",
    "transformers.models.siglip.modeling_siglip:SiglipEncoderLayer",
)


def block_classes(extra: list[str] | tuple[str, ...] = ()) -> set[type[nn.Module]]:
    """The block classes of mmclip's towers (its own transformer and perceiver blocks, timm ViT blocks and
    ConvNeXt stages, BERT / GPT-2 / CLIP / SigLIP layers from transformers) plus ``extra``
    (``"module:Class"`` strings); classes of packages that are not installed are left out.

    Raises:
        ValueError: an ``extra`` entry that does not name a class.
    """
    found: set[type[nn.Module]] = set()
    for spec in (*_BLOCKS, *extra):
        module_name, _, name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            if spec in extra:
                raise ValueError(f"{spec!r} does not name a class: write it as 'package.module:ClassName'") from None
            continue
        found.add(cls)
    return found


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "sharded",
    activation_checkpointing: bool = False,
    extra_blocks: list[str] | tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """Lightning's FSDPStrategy with one wrap unit per block of any mmclip tower (:func:`block_classes`).

    Args:
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD`` or ``NO_SHARD``.
        state_dict_type: ``"sharded"`` (each rank writes its shard through ``torch.distributed.checkpoint``;
            a checkpoint is a directory, and ``resume=`` takes it) or ``"full"`` (one file gathered on rank 0).
        activation_checkpointing: recompute every block's activations in backward (memory for time).
        extra_blocks: further block classes to wrap, as ``"package.module:ClassName"``.
        **kwargs: passed to ``FSDPStrategy`` (``cpu_offload``, ``limit_all_gathers``, ...).
    """
    blocks = block_classes(extra_blocks)
    kwargs.setdefault("auto_wrap_policy", blocks)
    if activation_checkpointing:
        kwargs.setdefault("activation_checkpointing_policy", blocks)
    return _strategy_class()(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)


def lift_scalar_parameters(module: nn.Module) -> list[str]:
    """Gives every 0-d parameter of ``module`` the shape (1,), in place, and returns their names.

    FSDP cannot flatten 0-d parameters (a CLIP model's ``logit_scale``, SigLIP's ``logit_bias``); a (1,) one
    broadcasts the same in every use. ``DualEncoder`` loads either shape, so the sharded checkpoints such a run
    writes stay model sources. Run it before the optimizer is built: it replaces the parameter objects.
    """
    lifted = []
    for owner_name, owner in module.named_modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.dim() == 0:
                lifted_param = nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad)
                setattr(owner, name, lifted_param)
                lifted.append(f"{owner_name}.{name}" if owner_name else name)
    module._lifted_parameters = (*getattr(module, "_lifted_parameters", ()), *lifted)  # read when loading
    return lifted


@functools.cache
def _strategy_class() -> type:
    from lightning.pytorch.strategies import FSDPStrategy

    class MMClipFSDPStrategy(FSDPStrategy):
        """FSDPStrategy that first lifts 0-d parameters to (1,) (:func:`lift_scalar_parameters`)."""

        def _setup_model(self, model: nn.Module) -> nn.Module:
            lift_scalar_parameters(model)
            return super()._setup_model(model)

    return MMClipFSDPStrategy
