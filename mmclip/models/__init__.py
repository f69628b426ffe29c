"""Models: the dual encoder, named configs, checkpoint converters, frozen featurizers, captioning, and the
Flamingo-style vision-language bridge."""

from mmclip.models.caption_prefix import PrefixCaptioner, build_caption_targets
from mmclip.models.configs import get_model_config, list_models, register_model_config
from mmclip.models.dual_encoder import DualEncoder
from mmclip.models.factory import (
    ResolvedModel,
    count_parameters,
    create_model,
    create_model_and_transforms,
    from_pretrained,
    get_tokenizer,
    load_weights,
    merge_config,
    resolve_model,
)
from mmclip.models.featurizer import (
    Featurizer,
    FeaturizerOutput,
    FrozenModule,
    FrozenWeightsError,
    TextFeaturizer,
)
from mmclip.models.vlm import VisionLanguageModel

__all__ = [
    "DualEncoder",
    "Featurizer",
    "FeaturizerOutput",
    "FrozenModule",
    "FrozenWeightsError",
    "PrefixCaptioner",
    "ResolvedModel",
    "TextFeaturizer",
    "VisionLanguageModel",
    "build_caption_targets",
    "count_parameters",
    "create_model",
    "create_model_and_transforms",
    "from_pretrained",
    "get_tokenizer",
    "load_weights",
    "merge_config",
    "register_model_config",
    "resolve_model",
    "get_model_config",
    "list_models",
]
