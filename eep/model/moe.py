"""The sparse MoE block: a router that picks experts, and the locally held experts' weights.

Glossary (as in ``eep.placement``): a *logical* expert ``e`` in ``[0, num_experts)`` is what
the router names; a rank holds some of them, its *local* experts, stacked in local order
``0..L-1`` in two contiguous tensors so a grouped GEMM and a weight arena can use them as is.

The router is its own module so that other routing schemes (DeepSeek's grouped top-k with
a score-correction bias) plug into the same block; ``shared`` is where always-on shared
experts go (none in Qwen3-MoE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Base of routers: ``route(x [T, H]) -> (topk_ids [T, K] int64, topk_weights [T, K] fp32)``."""

    top_k: int

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class SoftmaxTopKRouter(Router):
    """Qwen3-MoE routing: ``softmax(x @ W^T)`` in fp32, top-k, renormalised if asked.

    ``weight`` is ``[num_experts, H]`` (checkpoint name ``mlp.gate.weight``).
    """

    def __init__(
        self, hidden: int, num_experts: int, top_k: int, renormalize: bool, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden, device=device, dtype=dtype), requires_grad=False
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(F.linear(x, self.weight).float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_ids, topk_weights


class MoEBlock(nn.Module):
    """Router + the local experts' SwiGLU weights (+ optional shared experts).

    ``w_gate_up``: ``[L, 2 * I, H]`` (rows ``0..I-1`` the gate projection, ``I..2I-1`` the up
    projection); ``w_down``: ``[L, H, I]``; ``L = len(local_experts)``.
    """

    def __init__(
        self,
        router: Router,
        hidden: int,
        intermediate: int,
        num_experts: int,
        local_experts: Sequence[int],
        shared: nn.Module | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.router = router
        self.shared = shared
        self.intermediate = intermediate
        self.local_experts = _check_local(local_experts, num_experts)
        n = len(self.local_experts)
        self.w_gate_up = nn.Parameter(
            torch.empty(n, 2 * intermediate, hidden, device=device, dtype=dtype),
            requires_grad=False,
        )
        self.w_down = nn.Parameter(
            torch.empty(n, hidden, intermediate, device=device, dtype=dtype), requires_grad=False
        )
        log2local = torch.full((num_experts,), -1, dtype=torch.int64)
        log2local[list(self.local_experts)] = torch.arange(n)
        self.register_buffer("log2local", log2local.to(device), persistent=False)

    @property
    def gate(self) -> Router:
        """The router, under its Hugging Face name."""
        return self.router

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> ``(topk_ids [T, K] int64 logical, topk_weights [T, K] fp32)``."""
        return self.router.route(x)

    def expert_forward(self, x: torch.Tensor, local_idx: int) -> torch.Tensor:
        """One local expert's SwiGLU: ``x [N, H] -> [N, H]`` in ``x.dtype``."""
        gate, up = F.linear(x, self.w_gate_up[local_idx]).split(self.intermediate, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_down[local_idx])

    def forward_local(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """``sum_k topk_weights[t, k] * expert[topk_ids[t, k]](x[t])`` (+ shared experts).

        ``x [T, H]``, ``topk_ids [T, K]`` int64 (logical; every one must be local),
        ``topk_weights [T, K]`` fp32 -> ``[T, H]`` in ``x.dtype``.
        """
        local_ids = self.log2local[topk_ids]
        if bool((local_ids < 0).any()):
            missing = sorted(set(topk_ids[local_ids < 0].tolist()))
            raise ValueError(f"forward_local was routed to non-local experts {missing}.")
        out = torch.zeros_like(x) if self.shared is None else self.shared(x)
        flat_ids = local_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=len(self.local_experts)).tolist()
        k = topk_ids.shape[1]
        start = 0
        for local_idx, count in enumerate(counts):
            if count:
                rows = order[start : start + count]
                tokens = rows // k
                y = self.expert_forward(x[tokens], local_idx)
                w = topk_weights.reshape(-1)[rows, None]
                out.index_add_(0, tokens, (y.float() * w).to(x.dtype))
            start += count
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route and run on this process alone: ``[T, H] -> [T, H]`` (all experts local)."""
        topk_ids, topk_weights = self.route(x)
        return self.forward_local(x, topk_ids, topk_weights)


def _check_local(local_experts: Sequence[int], num_experts: int) -> tuple[int, ...]:
    local = tuple(int(e) for e in local_experts)
    if len(set(local)) != len(local) or any(not 0 <= e < num_experts for e in local):
        raise ValueError(
            f"local_experts must be distinct expert ids in [0, {num_experts}), got {list(local)}."
        )
    return local
