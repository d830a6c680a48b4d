"""The model configuration: the Qwen3-MoE fields of a Hugging Face ``config.json``.

Built once (``ModelConfig.from_dir``) and passed down. ``to_hf_dict`` writes a ``config.json``
that transformers' ``Qwen3MoeConfig`` reads back as the same model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

CONFIG_FILE = "config.json"
MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"

# config.json fields we do not model; a value other than this one means another architecture
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "attention_bias": False,
    "use_sliding_window": False,
}
_ALIASES = {"num_local_experts": "num_experts"}
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "moe_intermediate_size",
    "intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "max_position_embeddings",
    "decoder_sparse_step",
)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A Qwen3-MoE model's shape. Layer ``i`` is MoE unless :meth:`is_moe_layer` says dense."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"model config field {name} must be an integer >= 1, got {value!r}."
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must not exceed num_experts "
                f"({self.num_experts})."
            )
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"model config field {name} must be a number > 0, got {value!r}.")
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model config field {name} must be true or false.")
        self._check_mlp_only_layers()

    def _check_mlp_only_layers(self) -> None:
        layers = tuple(self.mlp_only_layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)]
        bad += [i for i in layers if isinstance(i, int) and not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"mlp_only_layers must be layer indices in [0, {self.num_hidden_layers}), "
                f"got {list(layers)!r}."
            )
        object.__setattr__(self, "mlp_only_layers", tuple(sorted(set(layers))))

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` has a sparse MoE block (else a dense SwiGLU MLP); HF's rule."""
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated again), e.g. ``num_hidden_layers=2``."""
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json -------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` contents (transformers 4.x and 5.x both read it)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        out.update(_UNSUPPORTED_DEFAULTS)
        out.update(
            architectures=[ARCHITECTURE],
            model_type=MODEL_TYPE,
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
            sliding_window=None,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        )
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
        """Parse a ``config.json`` dict; anything missing or wrong is a :class:`CheckpointError`."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where} must hold a JSON object, got {type(raw).__name__}.")
        _check_architecture(raw, where)
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: raw[k] for k in fields if k in raw}
        for alias, name in _ALIASES.items():  # transformers 5 writes num_local_experts
            if name not in values and alias in raw:
                values[name] = raw[alias]
        values.setdefault("rope_theta", _rope_theta(raw, where))
        if "head_dim" not in values and "hidden_size" in raw and "num_attention_heads" in raw:
            values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        values.setdefault("decoder_sparse_step", 1)
        values.setdefault("tie_word_embeddings", False)
        values["mlp_only_layers"] = tuple(values.get("mlp_only_layers") or ())
        missing = sorted(f for f in fields if f not in values or values[f] is None)
        if missing:
            raise CheckpointError(
                f"{where} lacks the field(s) {', '.join(missing)}: is it a Qwen3-MoE config.json?"
            )
        try:
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{where} is not a valid model config: {exc}") from exc

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ModelConfig:
        """Read ``path/config.json`` (a Hugging Face model directory)."""
        file = Path(path) / CONFIG_FILE
        if not file.is_file():
            raise CheckpointError(
                f"no {CONFIG_FILE} in {str(path)!r}: give a Hugging Face model directory, or "
                "make one with `eep make-weights`."
            )
        try:
            raw = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot parse {file} as JSON: {exc}") from exc
        return cls.from_hf_dict(raw, where=str(file))

    # --- presets --------------------------------------------------------------------------

    @classmethod
    def tiny(cls) -> ModelConfig:
        """A 4-layer toy (layer 1 dense) for CPU tests: ~0.5 M parameters."""
        return cls(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            moe_intermediate_size=32,
            intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            decoder_sparse_step=1,
            mlp_only_layers=(1,),
        )

    @classmethod
    def mid(cls) -> ModelConfig:
        """A mid-size model for CPU benchmarks: 4 MoE layers of 64 experts (top 4), hidden 512,
        ~110 M parameters (0.44 GB in fp32), about 200x the tiny one."""
        return cls(
            vocab_size=8192,
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            moe_intermediate_size=256,
            intermediate_size=1024,
            num_experts=64,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            decoder_sparse_step=1,
            mlp_only_layers=(),
        )

    @classmethod
    def qwen3_30b_a3b(cls) -> ModelConfig:
        """Qwen3-30B-A3B's shape (its published config.json)."""
        return cls(
            vocab_size=151936,
            hidden_size=2048,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=768,
            intermediate_size=6144,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
        )


def _check_architecture(raw: dict[str, Any], where: str) -> None:
    model_type = raw.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{where} has model_type {model_type!r}; only {MODEL_TYPE!r} models are supported."
        )
    for key, want in _UNSUPPORTED_DEFAULTS.items():
        if raw.get(key, want) not in (want, None):
            raise CheckpointError(f"{where} sets {key}={raw[key]!r}; only {want!r} is supported.")


def _rope_theta(raw: dict[str, Any], where: str) -> Any:
    """``rope_theta`` (transformers 4.x) or ``rope_parameters.rope_theta`` (5.x)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if params else "default"
    if rope_type != "default":
        raise CheckpointError(
            f"{where} asks for rope_type {rope_type!r}; only plain (default) RoPE is supported."
        )
    return raw.get("rope_theta", params.get("rope_theta"))
