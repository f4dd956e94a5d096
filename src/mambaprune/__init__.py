"""mambaprune: training-free visual token pruning for Mamba-based multimodal LLMs."""
from .models import MambaConfig, MambaLM
from .pruning import TokenSequence

__version__ = "0.1.0"
__all__ = ["MambaLM", "MambaConfig", "TokenSequence", "__version__"]
