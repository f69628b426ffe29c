"""Models: the dual encoder, named configs, checkpoint converters, frozen featurizers, captioning."""

from mmclip.models.caption_prefix import PrefixCaptioner, build_caption_targets
from mmclip.models.dual_encoder import DualEncoder
from mmclip.models.factory import count_parameters, create_model, get_model_config, list_models
from mmclip.models.featurizer import Featurizer, FeaturizerOutput, FrozenWeightsError, TextFeaturizer

__all__ = [
    "DualEncoder",
    "Featurizer",
    "FeaturizerOutput",
    "FrozenWeightsError",
    "PrefixCaptioner",
    "TextFeaturizer",
    "build_caption_targets",
    "count_parameters",
    "create_model",
    "get_model_config",
    "list_models",
]
