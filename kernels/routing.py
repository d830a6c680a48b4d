"""Routing: router logits -> top-k logical experts and weights -> live physical replicas.

The view (``rank_mask``, ``log2phy``, ``replica_count``) is read on the device, so a CUDA graph
that captured ``route`` follows every later view without recapture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from eep.kernels.view import DeviceView

_BLOCK_T = 16


@dataclass(frozen=True)
class RoutingResult:
    """``topk_idx`` ``[T, K]`` int32 logical experts; ``topk_weights`` ``[T, K]`` float32;
    ``topk_phy`` ``[T, K]`` int32 physical experts, ``-1`` where no live replica exists (that
    choice is dropped by dispatch and combine, its weight not renormalised)."""

    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    topk_phy: torch.Tensor


@triton.jit
def _select_replicas(
    expert,
    valid,
    tok,
    log2phy_ptr,
    replica_count_ptr,
    rank_mask_ptr,
    MAX_REPLICAS: tl.constexpr,
    EXPERTS_PER_SLOT: tl.constexpr,
    ELASTIC: tl.constexpr,
):
    """Physical replica for each logical ``expert`` (any shape): live replica number
    ``tok % num_live`` in ``log2phy`` order, ``-1`` if none is live or ``valid`` is false."""
    count = tl.load(replica_count_ptr + expert, mask=valid, other=0)
    if ELASTIC:
        num_live = tl.zeros_like(count)
        for r in tl.static_range(MAX_REPLICAS):
            phy = tl.load(log2phy_ptr + expert * MAX_REPLICAS + r, mask=valid, other=-1)
            ok = (r < count) & (phy >= 0)
            alive = tl.load(rank_mask_ptr + phy // EXPERTS_PER_SLOT, mask=ok, other=0)
            num_live += (ok & (alive != 0)).to(tl.int32)
        want = tok % tl.maximum(num_live, 1)
        chosen = tl.full(count.shape, -1, tl.int32)
        seen = tl.zeros_like(count)
        for r in tl.static_range(MAX_REPLICAS):
            phy = tl.load(log2phy_ptr + expert * MAX_REPLICAS + r, mask=valid, other=-1)
            ok = (r < count) & (phy >= 0)
            alive = tl.load(rank_mask_ptr + phy // EXPERTS_PER_SLOT, mask=ok, other=0)
            live = ok & (alive != 0)
            chosen = tl.where(live & (seen == want), phy, chosen)
            seen += live.to(tl.int32)
    else:
        want = tok % tl.maximum(count, 1)
        ok = valid & (count > 0)
        chosen = tl.load(log2phy_ptr + expert * MAX_REPLICAS + want, mask=ok, other=-1)
    return chosen


@triton.jit(do_not_specialize=["num_tokens", "spread_offset"])
def _route_kernel(
    logits_ptr,
    log2phy_ptr,
    replica_count_ptr,
    rank_mask_ptr,
    topk_idx_ptr,
    topk_weights_ptr,
    topk_phy_ptr,
    num_tokens,
    num_experts,
    stride_logits,
    spread_offset,
    TOPK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    MAX_REPLICAS: tl.constexpr,
    EXPERTS_PER_SLOT: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    ELASTIC: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < num_tokens
    e = tl.arange(0, BLOCK_E)
    e_mask = e < num_experts
    logits = tl.load(
        logits_ptr + tok[:, None].to(tl.int64) * stride_logits + e[None, :],
        mask=tok_mask[:, None] & e_mask[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    logits = tl.where(e_mask[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(tok_mask, row_max, 0.0)
    expo = tl.where(e_mask[None, :], tl.exp(logits - row_max[:, None]), 0.0)
    denom = tl.sum(expo, axis=1)

    k_idx = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    weight = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    work = logits
    for k in tl.static_range(TOPK):
        best = tl.argmax(work, axis=1, tie_break_left=True).to(tl.int32)
        hit = e[None, :] == best[:, None]
        w_k = tl.sum(tl.where(hit, expo, 0.0), axis=1)
        work = tl.where(hit, float("-inf"), work)
        chosen = tl.where(k_idx[None, :] == k, best[:, None], chosen)
        weight = tl.where(k_idx[None, :] == k, w_k[:, None], weight)
    if RENORMALIZE:
        denom = tl.sum(weight, axis=1)
    weight = weight / tl.where(denom > 0, denom, 1.0)[:, None]  # padded rows: no 0 / 0

    valid = tok_mask[:, None] & (k_idx[None, :] < TOPK)
    phy = _select_replicas(
        chosen,
        valid,
        tok[:, None] + spread_offset,
        log2phy_ptr,
        replica_count_ptr,
        rank_mask_ptr,
        MAX_REPLICAS,
        EXPERTS_PER_SLOT,
        ELASTIC,
    )
    out = tok[:, None] * TOPK + k_idx[None, :]
    tl.store(topk_idx_ptr + out, chosen, mask=valid)
    tl.store(topk_weights_ptr + out, weight, mask=valid)
    tl.store(topk_phy_ptr + out, phy, mask=valid)


@triton.jit(do_not_specialize=["num_tokens", "spread_offset"])
def _map_replicas_kernel(
    topk_idx_ptr,
    log2phy_ptr,
    replica_count_ptr,
    rank_mask_ptr,
    topk_phy_ptr,
    num_tokens,
    spread_offset,
    TOPK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    MAX_REPLICAS: tl.constexpr,
    EXPERTS_PER_SLOT: tl.constexpr,
    ELASTIC: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k_idx = tl.arange(0, BLOCK_K)
    valid = (tok < num_tokens)[:, None] & (k_idx[None, :] < TOPK)
    offs = tok[:, None] * TOPK + k_idx[None, :]
    expert = tl.load(topk_idx_ptr + offs, mask=valid, other=0)
    valid = valid & (expert >= 0)
    phy = _select_replicas(
        expert,
        valid,
        tok[:, None] + spread_offset,
        log2phy_ptr,
        replica_count_ptr,
        rank_mask_ptr,
        MAX_REPLICAS,
        EXPERTS_PER_SLOT,
        ELASTIC,
    )
    tl.store(topk_phy_ptr + offs, phy, mask=(tok < num_tokens)[:, None] & (k_idx[None, :] < TOPK))


def route(
    logits: torch.Tensor,
    view: DeviceView,
    *,
    topk: int,
    experts_per_slot: int,
    spread_offset: int = 0,
    renormalize: bool = True,
    elastic: bool = True,
    out: RoutingResult | None = None,
) -> RoutingResult:
    """Softmax top-k over ``logits`` ``[T, E]`` (float32/bf16), then one live replica per choice.

    Token ``t`` takes live replica ``(t + spread_offset) % num_live`` of its expert, so tokens
    spread over replicas; give each rank its own ``spread_offset`` to spread across ranks too.
    ``elastic=False`` skips the ``rank_mask`` checks. ``out`` reuses result buffers (graphs).
    """
    num_tokens, num_experts = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = out or _empty_result(num_tokens, topk, logits.device)
    grid = (max(1, triton.cdiv(num_tokens, _BLOCK_T)),)
    _route_kernel[grid](
        logits,
        view.log2phy,
        view.replica_count,
        view.rank_mask,
        out.topk_idx,
        out.topk_weights,
        out.topk_phy,
        num_tokens,
        num_experts,
        logits.stride(0),
        spread_offset,
        TOPK=topk,
        BLOCK_K=triton.next_power_of_2(topk),
        BLOCK_T=_BLOCK_T,
        BLOCK_E=triton.next_power_of_2(num_experts),
        MAX_REPLICAS=view.log2phy.shape[1],
        EXPERTS_PER_SLOT=experts_per_slot,
        RENORMALIZE=renormalize,
        ELASTIC=elastic,
    )
    return out


def map_to_physical(
    topk_idx: torch.Tensor,
    view: DeviceView,
    *,
    experts_per_slot: int,
    spread_offset: int = 0,
    elastic: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replica selection alone, for models with their own gate: ``topk_idx`` ``[T, K]`` int32
    logical experts (``-1`` = none) -> ``[T, K]`` int32 physical experts (``-1`` = dropped)."""
    num_tokens, topk = topk_idx.shape
    topk_idx = topk_idx.contiguous()
    if out is None:
        out = torch.empty(num_tokens, topk, dtype=torch.int32, device=topk_idx.device)
    grid = (max(1, triton.cdiv(num_tokens, _BLOCK_T)),)
    _map_replicas_kernel[grid](
        topk_idx,
        view.log2phy,
        view.replica_count,
        view.rank_mask,
        out,
        num_tokens,
        spread_offset,
        TOPK=topk,
        BLOCK_K=triton.next_power_of_2(topk),
        BLOCK_T=_BLOCK_T,
        MAX_REPLICAS=view.log2phy.shape[1],
        EXPERTS_PER_SLOT=experts_per_slot,
        ELASTIC=elastic,
    )
    return out


def _empty_result(num_tokens: int, topk: int, device: torch.device) -> RoutingResult:
    shape = (num_tokens, topk)
    return RoutingResult(
        torch.empty(shape, dtype=torch.int32, device=device),
        torch.empty(shape, dtype=torch.float32, device=device),
        torch.empty(shape, dtype=torch.int32, device=device),
    )
