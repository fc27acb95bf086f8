"""megatron-core training engine (TP / PP / DP) for Llama and Qwen2 Hugging Face checkpoints.

``MegatronEngine`` (``engine.py``) is the engine; ``hf_mapping.py`` maps HF tensors to megatron's and
back; ``cuda_shim.py`` is the list of patches that let megatron-core run on a CPU-only host, applied
by the engine's constructor only. Importing this package imports neither megatron nor the shim's
patches.
"""

from rlhf.engines.megatron.engine import MegatronEngine
from rlhf.engines.megatron.hf_mapping import MegatronEngineError

__all__ = ["MegatronEngine", "MegatronEngineError"]
