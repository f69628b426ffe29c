"""Foreign checkpoints -> mmclip: safe file reading (``checkpoint``), OpenAI / OpenCLIP key rules and
configs (``openclip``), Hugging Face CLIP / SigLIP directories and export (``hf``). The converters do not
import each other; the resolver (``mmclip.models.factory``) chooses between them."""

from mmclip.models.convert.checkpoint import CheckpointError, load_checkpoint, load_state_dict
from mmclip.models.convert.openclip import convert_openclip_state_dict, spec_from_openclip_config

__all__ = [
    "CheckpointError",
    "convert_openclip_state_dict",
    "load_checkpoint",
    "load_state_dict",
    "spec_from_openclip_config",
]
