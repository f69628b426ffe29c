"""Models: the dual encoder, named configs and checkpoint converters."""

from mmclip.models.dual_encoder import DualEncoder
from mmclip.models.factory import count_parameters, create_model, get_model_config, list_models

__all__ = ["DualEncoder", "count_parameters", "create_model", "get_model_config", "list_models"]
