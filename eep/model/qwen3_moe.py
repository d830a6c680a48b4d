"""The Qwen3-MoE decoder: embedding, decoder layers (attention + MoE or dense MLP), final norm;
and :func:`load_model`, which builds one and fills it from a Hugging Face checkpoint.

The engine drives the pieces itself (its own KV cache and attention, expert dispatch over the
fabric); :meth:`Qwen3MoeModel.forward` is the plain single-process causal forward used by tests
and as the reference.

Loading plans every copy (checkpoint tensor -> parameter), checks them all, then copies: only
the tensors the model holds are read, the non-expert ones and its local experts'.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointReader, Shape, check_tensors, expert_tensor_names
from .config import ModelConfig
from .layers import Attention, DenseMLP, RMSNorm, causal_attention
from .moe import MoEBlock, SoftmaxTopKRouter

__all__ = ["DecoderLayer", "Qwen3MoeModel", "hf_name", "load_model", "load_weights"]


class DecoderLayer(nn.Module):
    """Pre-norm residual layer: ``h += attn(norm(h))``; ``h += mlp_or_moe(norm(h))``.

    Exactly one of ``moe`` (MoE layers) and ``mlp`` (dense layers) is set.
    """

    def __init__(self, config: ModelConfig, idx: int, local_experts, device, dtype) -> None:
        super().__init__()
        self.idx = idx
        self.is_moe = config.is_moe_layer(idx)
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(hidden, eps, device, dtype)
        self.self_attn = Attention(config, device, dtype)
        self.moe: MoEBlock | None = None
        self.mlp: DenseMLP | None = None
        if self.is_moe:
            self.moe = _qwen3_moe_block(config, local_experts, device, dtype)
        else:
            self.mlp = DenseMLP(hidden, config.intermediate_size, device, dtype)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP half on this process alone: ``[T, H] -> [T, H]`` (MoE: all experts local)."""
        return self.moe(x) if self.is_moe else self.mlp(x)


def _qwen3_moe_block(config: ModelConfig, local_experts, device, dtype) -> MoEBlock:
    router = SoftmaxTopKRouter(
        config.hidden_size,
        config.num_experts,
        config.num_experts_per_tok,
        config.norm_topk_prob,
        device,
        dtype,
    )
    return MoEBlock(
        router,
        config.hidden_size,
        config.moe_intermediate_size,
        config.num_experts,
        local_experts,
        device=device,
        dtype=dtype,
    )


class Qwen3MoeModel(nn.Module):
    """Qwen3-MoE with only ``local_experts`` materialised in each MoE layer.

    ``local_experts``: the logical expert ids this rank holds, in local (physical) order;
    ``None`` = all experts in order. Parameters are allocated uninitialised: fill them with
    :func:`eep.model.load_model` (or copy into them).
    """

    def __init__(
        self,
        config: ModelConfig,
        local_experts: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.config = config
        local = tuple(range(config.num_experts) if local_experts is None else local_experts)
        self.local_experts = local
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden, device=device, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, local, device, dtype) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(hidden, config.rms_norm_eps, device, dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(
                hidden, config.vocab_size, bias=False, device=device, dtype=dtype
            )
            self.lm_head.weight.requires_grad_(False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[vocab, H]``: the output projection (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` int64 -> ``[T, H]`` in the model dtype."""
        return self.embed_tokens(input_ids)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: ``h [T, H]`` -> logits ``[T, vocab]`` fp32."""
        return torch.nn.functional.linear(self.norm(h), self.lm_head_weight).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Causal forward, no cache: ``input_ids [B, S]`` int64 -> logits ``[B, S, vocab]`` fp32."""
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).repeat(b)
        h = self.embed(input_ids.reshape(-1))
        for layer in self.layers:
            h = h + self._attention(layer, layer.input_layernorm(h), positions, b)
            h = h + layer.feed_forward(layer.post_attention_layernorm(h))
        return self.final(h).view(b, s, -1)

    @staticmethod
    def _attention(layer: DecoderLayer, x: torch.Tensor, positions: torch.Tensor, b: int):
        attn = layer.self_attn
        q, k, v = attn.qkv(x, positions)
        outs = [
            causal_attention(qi, ki, vi, attn.scale)
            for qi, ki, vi in zip(q.chunk(b), k.chunk(b), v.chunk(b), strict=True)
        ]
        return attn.out(torch.cat(outs))

    @torch.inference_mode()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation by full re-forward per token (reference only, O(S^2)):
        ``[B, S]`` int64 -> ``[B, S + max_new_tokens]`` int64."""
        ids = input_ids
        for _ in range(max_new_tokens):
            next_ids = self.forward(ids)[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
        return ids


# --- loading from a checkpoint --------------------------------------------------------------


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


def load_model(
    path: str | os.PathLike,
    local_experts: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    experts: bool = True,
) -> Qwen3MoeModel:
    """Build the model of ``path/config.json`` and fill it from the checkpoint's safetensors.

    Reads only what this rank needs (non-expert tensors and ``local_experts``' ones); every
    missing or mis-shaped tensor is named in one :class:`CheckpointError`.
    """
    config = ModelConfig.from_dir(path)
    model = Qwen3MoeModel(config, local_experts, device=device, dtype=dtype)
    load_weights(model, path, experts)
    return model
