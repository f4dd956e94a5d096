"""Models: the Mamba language model, vision towers, the projector, and the multimodal models built on them."""
from .checkpoints import CheckpointError, from_transformers_model, load_mamba_lm, save_mamba_lm
from .hub import HubError, resolve_folder
from .mamba_lm import MambaCache, MambaConfig, MambaLM, MambaOutput
from .registry import available_models, load_model, register_model
from .vlm import MambaVLM, PreparedInputs, VLMSpec

__all__ = ["MambaLM", "MambaConfig", "MambaCache", "MambaOutput", "CheckpointError", "load_mamba_lm",
           "save_mamba_lm", "from_transformers_model", "MambaVLM", "VLMSpec", "PreparedInputs", "load_model",
           "register_model", "available_models", "HubError", "resolve_folder"]
