"""The MoE model served by EEP ranks: Qwen3-MoE, its config, checkpoint loading, random weights.

``Qwen3MoeModel`` materialises only a rank's local experts; ``load_model`` reads just those
from a Hugging Face style directory; ``write_random_checkpoint`` makes one for any config.

Only the config and the errors load with the package: the front-end reads a model's config
and must not pay for (or need) torch. The rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import ModelConfig
from .errors import CheckpointError, ModelError

if TYPE_CHECKING:
    from .checkpoint import checkpoint_layout, expert_tensor_names
    from .qwen3_moe import DecoderLayer, Qwen3MoeModel, load_model
    from .random_weights import write_random_checkpoint

_LAZY = {
    "checkpoint_layout": "checkpoint",
    "expert_tensor_names": "checkpoint",
    "DecoderLayer": "qwen3_moe",
    "Qwen3MoeModel": "qwen3_moe",
    "load_model": "qwen3_moe",
    "write_random_checkpoint": "random_weights",
}

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


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
