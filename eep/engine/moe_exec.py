"""How an MoE layer reaches its experts: all local, or through a fabric.

Both paths combine the same way (``weighted_sum``: the top-k outputs summed in ``k`` order)
and run experts on CUDA with the same tiles (``expert_tiles``), both from
``eep.kernels.experts``, so a multi-rank run and a single-process run differ only in where
each expert ran.
"""

from __future__ import annotations

from typing import Protocol

import torch

from eep.fabrics.base import Fabric
from eep.kernels.experts import expert_tiles, weighted_sum
from eep.kernels.reference import select_replicas_ref
from eep.model.moe import MoEBlock


def run_experts(moe: MoEBlock, x: torch.Tensor, local_idx: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` ``[N, H]`` through local expert ``local_idx[n]`` -> ``[N, H]``."""
    if x.is_cuda:
        return run_experts_grouped(moe, x, local_idx)
    y = torch.empty_like(x)
    for idx in torch.unique(local_idx).tolist():
        rows = (local_idx == idx).nonzero().view(-1)
        y[rows] = moe.expert_forward(x[rows], idx)
    return y


def run_experts_grouped(moe: MoEBlock, x: torch.Tensor, local_idx: torch.Tensor) -> torch.Tensor:
    """``run_experts`` on CUDA: the rows sorted into one padded group per local expert and
    run through the grouped SwiGLU kernel (no host sync)."""
    from eep.kernels.grouped_gemm import grouped_swiglu

    n, hidden = x.shape
    num_local = moe.w_gate_up.shape[0]
    if n == 0:
        return torch.empty_like(x)
    order = torch.argsort(local_idx, stable=True)
    counts = torch.bincount(local_idx, minlength=num_local)
    starts = torch.cumsum(counts, 0) - counts
    expert = local_idx[order]
    pos = torch.arange(n, device=x.device) - starts[expert]
    groups = x.new_empty(num_local, n, hidden)
    groups[expert, pos] = x[order]
    tiles = expert_tiles()
    out = grouped_swiglu(
        groups,
        counts.to(torch.int32),
        moe.w_gate_up,
        moe.w_down,
        gate_up_tiles=tiles,
        down_tiles=tiles,
    )
    y = torch.empty_like(x)
    y[order] = out[expert, pos]
    return y


class MoEExecutor(Protocol):
    """How the engine runs a MoE layer: every executor has all three members."""

    graph_safe: bool  # a layer never syncs the host, so CUDA graphs can record it

    def __call__(self, layer_idx: int, moe: MoEBlock, x: torch.Tensor) -> torch.Tensor: ...

    def end_step(self) -> None:
        """After the step's last layer (a fabric that checks once per step raises here)."""


class LocalMoE:
    """Every expert on this process (the single-process reference path)."""

    graph_safe = False  # routes on the host

    def end_step(self) -> None:
        pass

    def __call__(self, layer_idx: int, moe: MoEBlock, x: torch.Tensor) -> torch.Tensor:
        topk_ids, weights = moe.route(x)
        local = moe.log2local[topk_ids].reshape(-1)
        tokens = torch.arange(x.shape[0]).repeat_interleave(topk_ids.shape[1])
        return weighted_sum(run_experts(moe, x[tokens], local), weights)


class FabricMoE:
    """Experts spread over slots: route to live physical replicas, dispatch, run the local
    experts on what arrived, combine. ``view`` supplies ``log2phy``, ``replica_count``,
    ``rank_mask`` and ``experts_per_slot`` of the view being served."""

    def __init__(self, fabric: Fabric, view):
        self.fabric, self.view = fabric, view

    @property
    def graph_safe(self) -> bool:
        """A layer never syncs the host, so CUDA graphs can record it (``symm`` on a GPU)."""
        return self.fabric.graph_safe

    def __call__(self, layer_idx: int, moe: MoEBlock, x: torch.Tensor) -> torch.Tensor:
        topk_ids, weights = moe.route(x)
        v = self.view
        if x.is_cuda:  # the Triton kernel: no host sync, graph-capturable
            # imported here: a CPU rank never defines Triton kernels (and a CPU test process
            # must set TRITON_INTERPRET before the first definition)
            from eep.kernels.routing import map_to_physical

            phy = map_to_physical(
                topk_ids.to(torch.int32), v.device_view, experts_per_slot=v.experts_per_slot
            )
        else:
            phy = select_replicas_ref(
                topk_ids, v.log2phy, v.replica_count, v.rank_mask, v.experts_per_slot
            )
        # dispatch, this slot's experts, combine (symm: all on the device, no host sync)
        return self.fabric.run_moe(moe, x, phy, weights, run_experts)

    def end_step(self) -> None:
        """After the step's last layer: a fabric that checks once per step raises here."""
        self.fabric.end_step()
