"""The MoE model served by EEP ranks: Qwen3-MoE, its config, checkpoint loading, random weights.

``Qwen3MoeModel`` materialises only a rank's local experts; ``load_model`` reads just those
from a Hugging Face style directory; ``write_random_checkpoint`` makes one for any config.
"""

from .checkpoint import checkpoint_layout, expert_tensor_names
from .config import ModelConfig
from .errors import CheckpointError, ModelError
from .qwen3_moe import DecoderLayer, Qwen3MoeModel, load_model
from .random_weights import write_random_checkpoint

__all__ = [
    "CheckpointError",
    "DecoderLayer",
    "ModelConfig",
    "ModelError",
    "Qwen3MoeModel",
    "checkpoint_layout",
    "expert_tensor_names",
    "load_model",
    "write_random_checkpoint",
]
