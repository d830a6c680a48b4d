"""Hugging Face checkpoint layout and reading: names, shapes, shards, validation.

The layout is HF's ``Qwen3MoeForCausalLM`` one, experts stored one tensor per projection
(``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``); transformers 5 merges those into
``mlp.experts.gate_up_proj [E, 2I, H]`` / ``mlp.experts.down_proj [E, H, I]`` when it loads
them, and that fused form is read here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
_MAX_NAMED = 12  # how many bad tensors an error message lists before counting the rest

Shape = tuple[int, ...]


def expert_tensor_names(config: ModelConfig, layer: int, expert: int) -> list[str]:
    """The checkpoint names of one expert of one MoE layer: gate, up, down projections."""
    if not config.is_moe_layer(layer) or not 0 <= expert < config.num_experts:
        raise ValueError(f"layer {layer} has no expert {expert}: not an MoE layer or bad id.")
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    return [f"{prefix}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]


def _attention_layout(config: ModelConfig, prefix: str) -> Iterator[tuple[str, Shape]]:
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    yield f"{prefix}.input_layernorm.weight", (h,)
    yield f"{prefix}.self_attn.q_proj.weight", (q, h)
    yield f"{prefix}.self_attn.k_proj.weight", (kv, h)
    yield f"{prefix}.self_attn.v_proj.weight", (kv, h)
    yield f"{prefix}.self_attn.o_proj.weight", (h, q)
    yield f"{prefix}.self_attn.q_norm.weight", (d,)
    yield f"{prefix}.self_attn.k_norm.weight", (d,)
    yield f"{prefix}.post_attention_layernorm.weight", (h,)


def _mlp_layout(config: ModelConfig, layer: int, prefix: str) -> Iterator[tuple[str, Shape]]:
    h = config.hidden_size
    if not config.is_moe_layer(layer):
        i = config.intermediate_size
        yield f"{prefix}.mlp.gate_proj.weight", (i, h)
        yield f"{prefix}.mlp.up_proj.weight", (i, h)
        yield f"{prefix}.mlp.down_proj.weight", (h, i)
        return
    i = config.moe_intermediate_size
    yield f"{prefix}.mlp.gate.weight", (config.num_experts, h)
    for e in range(config.num_experts):
        gate, up, down = expert_tensor_names(config, layer, e)
        yield gate, (i, h)
        yield up, (i, h)
        yield down, (h, i)


def layer_layout(config: ModelConfig, layer: int) -> list[tuple[str, Shape]]:
    """``(name, shape)`` of every tensor of decoder layer ``layer``, in checkpoint order."""
    prefix = f"model.layers.{layer}"
    return [*_attention_layout(config, prefix), *_mlp_layout(config, layer, prefix)]


def checkpoint_layout(config: ModelConfig) -> Iterator[tuple[str, Shape]]:
    """``(name, shape)`` of every tensor of the model, embedding first, layer by layer."""
    h, v = config.hidden_size, config.vocab_size
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(config.num_hidden_layers):
        yield from layer_layout(config, layer)
    yield "model.norm.weight", (h,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (v, h)


class CheckpointReader:
    """The tensors of a model directory's safetensors shards, opened lazily, one handle a file.

    The name -> shard map comes from ``model.safetensors.index.json`` when present, else from
    the shards' headers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path)
        self.files = self._index() if (self.root / INDEX_FILE).is_file() else self._scan()
        self._handles: dict[Path, object] = {}
        self._keys: dict[Path, set[str]] = {}

    def _index(self) -> dict[str, Path]:
        file = self.root / INDEX_FILE
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the weight_map of {file}: {exc}") from exc
        files = {name: self.root / shard for name, shard in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{file} names shard(s) {absent} that are not in {self.root}.")
        return files

    def _scan(self) -> dict[str, Path]:
        shards = sorted(self.root.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"no *.safetensors files in {str(self.root)!r}: is it a model directory?"
            )
        files: dict[str, Path] = {}
        for shard in shards:
            for name in self._open(shard).keys():
                files.setdefault(name, shard)
        return files

    def _open(self, shard: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(shard), framework="pt")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"cannot open checkpoint shard {shard}: {exc}") from exc

    def _handle(self, name: str):
        shard = self.files[name]
        if shard not in self._handles:
            self._handles[shard] = self._open(shard)
        return self._handles[shard]

    def __contains__(self, name: str) -> bool:
        """Whether ``name`` is in the checkpoint (in the index *and* in the shard it names)."""
        shard = self.files.get(name)
        if shard is None:
            return False
        if shard not in self._keys:
            self._keys[shard] = set(self._handle(name).keys())
        return name in self._keys[shard]

    def shape(self, name: str) -> Shape:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor ``name`` (or its ``[index]`` row block, read alone) on the CPU."""
        try:
            handle = self._handle(name)
            return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"cannot read {name!r} from {self.files[name]}: {exc}") from exc


def check_tensors(reader: CheckpointReader, wanted: list[tuple[str, Shape]], where: str) -> None:
    """Raise one :class:`CheckpointError` naming every absent or mis-shaped wanted tensor."""
    missing = [name for name, _ in wanted if name not in reader]
    wrong = [
        f"{name} is {list(got)}, expected {list(shape)}"
        for name, shape in wanted
        if name in reader and (got := reader.shape(name)) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_some(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_some(wrong)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not match its config.json: {'; '.join(problems)}. "
            "Regenerate it (`eep make-weights`) or fix config.json."
        )


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown if len(items) <= _MAX_NAMED else f"{shown} and {len(items) - _MAX_NAMED} more"
