"""mmclip: CLIP-style multimodal models as parts that snap together."""

from mmclip import losses as _losses  # noqa: F401  (registers the built-in losses)
from mmclip import towers as _towers  # noqa: F401  (registers the built-in towers and poolers)
from mmclip.layers.perceiver import PerceiverResampler
from mmclip.losses import ClipLoss, SigLipLoss
from mmclip.models import (
    DualEncoder,
    Featurizer,
    FeaturizerOutput,
    FrozenWeightsError,
    PrefixCaptioner,
    TextFeaturizer,
    build_caption_targets,
    count_parameters,
    create_model,
    create_model_and_transforms,
    from_pretrained,
    get_model_config,
    get_tokenizer,
    list_models,
    register_model_config,
)
from mmclip.models.convert import CheckpointError
from mmclip.models.convert.hf import export_hf, to_hf_clip
from mmclip.outputs import CaptionOutput, DualEncoderOutput, TowerOutput
from mmclip.registry import IMAGE_TOWERS, LOSSES, POOLERS, TEXT_TOWERS, Registry
from mmclip.tokenizers import ClipTokenizer, HFTokenizer, train_bpe_tokenizer
from mmclip.towers.image.naflex_vit import NaFlexImages

__version__ = "0.1.0"

__all__ = [
    "IMAGE_TOWERS",
    "LOSSES",
    "POOLERS",
    "TEXT_TOWERS",
    "CaptionOutput",
    "CheckpointError",
    "ClipLoss",
    "ClipTokenizer",
    "DualEncoder",
    "DualEncoderOutput",
    "Featurizer",
    "FeaturizerOutput",
    "FrozenWeightsError",
    "HFTokenizer",
    "NaFlexImages",
    "PerceiverResampler",
    "PrefixCaptioner",
    "Registry",
    "SigLipLoss",
    "TextFeaturizer",
    "TowerOutput",
    "build_caption_targets",
    "collate_images",
    "count_parameters",
    "export_hf",
    "from_pretrained",
    "to_hf_clip",
    "train_bpe_tokenizer",
    "create_model",
    "create_model_and_transforms",
    "register_model_config",
    "get_model_config",
    "get_tokenizer",
    "list_models",
]


def __getattr__(name: str) -> object:
    # the data layer (torchvision transforms) loads on first use: `import mmclip` stays light
    if name == "collate_images":
        from mmclip.data.naflex import collate_images

        return collate_images
    raise AttributeError(f"module 'mmclip' has no attribute {name!r}")
