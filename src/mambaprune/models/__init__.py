"""Models: the Mamba language model (and, later, the multimodal models built on it)."""
from .checkpoints import CheckpointError
from .mamba_lm import MambaCache, MambaConfig, MambaLM, MambaOutput

__all__ = ["MambaLM", "MambaConfig", "MambaCache", "MambaOutput", "CheckpointError"]
