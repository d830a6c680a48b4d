"""The Qwen3-MoE decoder: embedding, decoder layers (attention + MoE or dense MLP), final norm.

The engine drives the pieces itself (its own KV cache and attention, expert dispatch over the
fabric); :meth:`Qwen3MoeModel.forward` is the plain single-process causal forward used by tests
and as the reference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from .checkpoint import expert_tensor_names
from .config import ModelConfig
from .layers import Attention, DenseMLP, RMSNorm, causal_attention
from .moe import MoEBlock, SoftmaxTopKRouter

__all__ = ["DecoderLayer", "Qwen3MoeModel", "expert_tensor_names", "load_model"]


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
    from .loader import load_weights

    config = ModelConfig.from_dir(path)
    model = Qwen3MoeModel(config, local_experts, device=device, dtype=dtype)
    load_weights(model, path, experts)
    return model
