"""Fill a :class:`Qwen3MoeModel` from a checkpoint: plan every copy, check them all, then copy.

Only the tensors the model holds are read: the non-expert ones and its local experts'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointReader, Shape, check_tensors, expert_tensor_names
from .qwen3_moe import Qwen3MoeModel


@dataclass(frozen=True, slots=True)
class _Copy:
    """Checkpoint tensor ``name`` (row block ``index`` if set; whole shape ``shape``) -> ``dst``."""

    name: str
    shape: Shape
    dst: torch.Tensor
    index: int | None = None


def hf_name(param_name: str) -> str:
    """Our parameter name -> its checkpoint name (expert stacks excepted)."""
    if param_name.startswith("lm_head."):
        return param_name
    return "model." + param_name.replace(".moe.router.", ".mlp.gate.")


def _dense_copies(model: Qwen3MoeModel) -> list[_Copy]:
    return [
        _Copy(hf_name(name), tuple(p.shape), p)
        for name, p in model.named_parameters()
        if not name.endswith((".w_gate_up", ".w_down"))
    ]


def _expert_copies(model: Qwen3MoeModel, layer: int, reader: CheckpointReader) -> list[_Copy]:
    config, moe = model.config, model.layers[layer].moe
    inter, hidden, num = config.moe_intermediate_size, config.hidden_size, config.num_experts
    fused = f"model.layers.{layer}.mlp.experts."
    if fused + "gate_up_proj" in reader:  # transformers 5's merged layout
        return [
            c
            for local, e in enumerate(moe.local_experts)
            for c in (
                _Copy(fused + "gate_up_proj", (num, 2 * inter, hidden), moe.w_gate_up[local], e),
                _Copy(fused + "down_proj", (num, hidden, inter), moe.w_down[local], e),
            )
        ]
    copies = []
    for local, e in enumerate(moe.local_experts):
        gate, up, down = expert_tensor_names(config, layer, e)
        copies.append(_Copy(gate, (inter, hidden), moe.w_gate_up[local, :inter]))
        copies.append(_Copy(up, (inter, hidden), moe.w_gate_up[local, inter:]))
        copies.append(_Copy(down, (hidden, inter), moe.w_down[local]))
    return copies


def plan_copies(
    model: Qwen3MoeModel, reader: CheckpointReader, experts: bool = True
) -> list[_Copy]:
    copies = _dense_copies(model)
    for i, layer in enumerate(model.layers):
        if layer.is_moe and experts:
            copies += _expert_copies(model, i, reader)
    return copies


@torch.no_grad()
def load_weights(model: Qwen3MoeModel, path: str | os.PathLike, experts: bool = True) -> None:
    """Copy every tensor ``model`` holds from the checkpoint at ``path`` (without the local
    experts' when ``experts`` is False: a restarted rank pulls those from its peers); raises
    :class:`CheckpointError` (naming the tensors) before copying anything if one is absent or
    mis-shaped."""
    reader = CheckpointReader(path)
    copies = plan_copies(model, reader, experts)
    wanted = list(dict.fromkeys((c.name, c.shape) for c in copies))
    check_tensors(reader, wanted, str(Path(path)))
    for c in copies:
        c.dst.copy_(reader.get(c.name, c.index))
