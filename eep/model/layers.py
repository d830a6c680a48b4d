"""Dense building blocks of a decoder layer: RMSNorm, rotary embedding, GQA attention, SwiGLU.

Tensors are token-major and unbatched: ``[T, ...]`` with ``T`` tokens of any sequences; the
caller owns the KV cache and the attention kernel. Only the reference ``causal_attention``
attends, for the single-process full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` over the last dim, computed in fp32, cast back to ``x.dtype``."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention, as Qwen and Llama use it)."""

    def __init__(self, head_dim: int, theta: float, device=None) -> None:
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``positions [T]`` int64 -> ``(cos, sin)`` each ``[T, 1, D]`` in ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [T, n, D]`` rotated by ``cos/sin [T, 1, D]``."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def _linear(in_features: int, out_features: int, device, dtype) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    layer.weight.requires_grad_(False)
    return layer


class Attention(nn.Module):
    """Grouped-query attention projections with per-head q/k RMSNorm and RoPE.

    Parameter names follow the Hugging Face checkpoint (``q_proj``, ``k_norm``, ...).
    """

    def __init__(self, config, device=None, dtype=None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        hidden = config.hidden_size
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = _linear(hidden, q_dim, device, dtype)
        self.k_proj = _linear(hidden, kv_dim, device, dtype)
        self.v_proj = _linear(hidden, kv_dim, device, dtype)
        self.o_proj = _linear(q_dim, hidden, device, dtype)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, device, dtype)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, device, dtype)
        self.rotary = Rotary(self.head_dim, config.rope_theta, device)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x [T, H]``, ``positions [T]`` int64 -> ``q [T, n_heads, D]``, ``k, v [T, n_kv, D]``,
        with q/k normalised per head and rotated; all in ``x.dtype``."""
        t = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(t, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin), v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """``o [T, n_heads * D]`` -> ``[T, H]``."""
        return self.o_proj(o)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Reference attention of one sequence: ``q [S, n_heads, D]``, ``k, v [S, n_kv, D]`` ->
    ``[S, n_heads * D]``, causal, kv heads shared by ``n_heads // n_kv`` query heads."""
    s, n_heads, d = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        is_causal=True,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1).reshape(s, n_heads * d)


class DenseMLP(nn.Module):
    """SwiGLU MLP of a dense layer: ``down(silu(gate x) * up x)``; ``[T, H] -> [T, H]``."""

    def __init__(self, hidden: int, intermediate: int, device=None, dtype=None) -> None:
        super().__init__()
        self.gate_proj = _linear(hidden, intermediate, device, dtype)
        self.up_proj = _linear(hidden, intermediate, device, dtype)
        self.down_proj = _linear(intermediate, hidden, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
