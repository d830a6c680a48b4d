"""Pure-torch references of every EP kernel: the tests' oracle. Slow and obvious on purpose.

Layouts shared with the kernels (``S`` slots, ``L`` experts per slot, ``C`` max tokens per rank,
``K`` top-k, ``H`` hidden):
- routing output: ``topk_idx`` / ``topk_phy`` ``[T, K]`` int32 (logical / physical expert,
  physical ``-1`` when no live replica exists), ``topk_weights`` ``[T, K]`` float32;
- receive side of dispatch, per destination slot: ``recv_x`` ``[L, S * C, H]`` where the rows
  of local expert ``l`` sent by slot ``s`` are ``recv_x[l, s * C : s * C + recv_m[l, s]]``, in
  the sender's flat ``t * K + k`` order; ``recv_src_idx`` holds that flat index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RouteRef:
    topk_idx: torch.Tensor  # [T, K] int32 logical expert
    topk_weights: torch.Tensor  # [T, K] float32
    topk_phy: torch.Tensor  # [T, K] int32 physical expert, -1 when orphaned


@dataclass(frozen=True)
class DispatchRef:
    """What one destination slot receives."""

    recv_x: torch.Tensor  # [L, S * C, H], rows past recv_m are zero
    recv_m: torch.Tensor  # [L, S] int32
    recv_src_idx: torch.Tensor  # [L, S * C] int32, -1 past recv_m
    recv_weights: torch.Tensor  # [L, S * C] float32, 0 past recv_m


def topk_ref(logits: torch.Tensor, topk: int, renormalize: bool) -> tuple[torch.Tensor, ...]:
    """Softmax top-k of ``[T, E]`` logits; ties go to the lower expert id."""
    work = logits.float().clone()
    probs = torch.softmax(logits.float(), dim=-1)
    idx = []
    for _ in range(topk):
        best = torch.argmax(work, dim=-1)  # first maximum on ties
        idx.append(best)
        work.scatter_(1, best[:, None], float("-inf"))
    topk_idx = torch.stack(idx, dim=1) if idx else torch.zeros(logits.shape[0], 0).long()
    weights = torch.gather(probs, 1, topk_idx)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return topk_idx.to(torch.int32), weights


def select_replicas_ref(
    topk_idx: torch.Tensor,
    log2phy: torch.Tensor,
    replica_count: torch.Tensor,
    rank_mask: torch.Tensor,
    experts_per_slot: int,
    spread_offset: int = 0,
    elastic: bool = True,
) -> torch.Tensor:
    """Physical replica of each ``[T, K]`` logical choice; ``-1`` if none is live.

    Token ``t`` takes live replica ``(t + spread_offset) % num_live`` in ``log2phy`` order, so
    consecutive tokens spread over the replicas. ``elastic=False`` ignores ``rank_mask``.
    """
    num_tokens = topk_idx.shape[0]
    e = topk_idx.long()
    phys = log2phy.long()[e]  # [T, K, R]
    r = torch.arange(log2phy.shape[1])
    valid = (r < replica_count.long()[e][..., None]) & (phys >= 0)
    if elastic:
        valid &= rank_mask.long()[phys.clamp(min=0) // experts_per_slot] != 0
    n_live = valid.sum(-1)
    tok = torch.arange(num_tokens)[:, None] + spread_offset
    j = tok % n_live.clamp(min=1)
    if elastic:
        pick = valid & ((valid.cumsum(-1) - 1) == j[..., None])
    else:
        pick = (r == j[..., None]) & (n_live[..., None] > 0)
    chosen = torch.where(pick, phys, torch.zeros_like(phys)).sum(-1)
    chosen = torch.where(pick.any(-1), chosen, -1)
    return chosen.to(torch.int32)


def route_ref(
    logits: torch.Tensor,
    log2phy: torch.Tensor,
    replica_count: torch.Tensor,
    rank_mask: torch.Tensor,
    *,
    topk: int,
    experts_per_slot: int,
    spread_offset: int = 0,
    renormalize: bool = True,
    elastic: bool = True,
) -> RouteRef:
    """Router logits ``[T, E]`` -> top-k logical experts, weights and live physical replicas."""
    topk_idx, weights = topk_ref(logits, topk, renormalize)
    phy = select_replicas_ref(
        topk_idx, log2phy, replica_count, rank_mask, experts_per_slot, spread_offset, elastic
    )
    return RouteRef(topk_idx, weights, phy)


def dispatch_ref(
    xs: list[torch.Tensor],
    topk_phys: list[torch.Tensor],
    topk_weights: list[torch.Tensor],
    *,
    experts_per_slot: int,
    max_tokens: int,
    senders: list[bool] | None = None,
) -> list[DispatchRef]:
    """Every slot's receive buffers after all slots with ``senders[s]`` dispatched.

    ``xs[s]`` ``[T_s, H]``, ``topk_phys[s]`` ``[T_s, K]`` int32, ``topk_weights[s]`` ``[T_s, K]``.
    """
    num_slots = len(xs)
    hidden, eps, cap = xs[0].shape[1], experts_per_slot, max_tokens
    senders = senders or [True] * num_slots
    out = [
        DispatchRef(
            torch.zeros(eps, num_slots * cap, hidden, dtype=xs[0].dtype),
            torch.zeros(eps, num_slots, dtype=torch.int32),
            torch.full((eps, num_slots * cap), -1, dtype=torch.int32),
            torch.zeros(eps, num_slots * cap, dtype=torch.float32),
        )
        for _ in range(num_slots)
    ]
    for s in range(num_slots):
        if not senders[s]:
            continue
        flat_phy = topk_phys[s].reshape(-1).long().cpu()
        flat_w = topk_weights[s].reshape(-1).float().cpu()
        topk = topk_phys[s].shape[1]
        for p in range(num_slots * eps):
            sel = torch.nonzero(flat_phy == p).flatten()
            dst, le, n = p // eps, p % eps, sel.numel()
            rows = slice(s * cap, s * cap + n)
            out[dst].recv_x[le, rows] = xs[s].cpu()[sel // topk]
            out[dst].recv_src_idx[le, rows] = sel.to(torch.int32)
            out[dst].recv_weights[le, rows] = flat_w[sel]
            out[dst].recv_m[le, s] = n
    return out


def gather_expert_outputs_ref(
    ys: list[torch.Tensor | None],
    recvs: list[DispatchRef],
    src: int,
    num_tokens: int,
    topk: int,
    max_tokens: int,
) -> torch.Tensor:
    """Rows ``[T, K, H]`` that slot ``src`` gets back from each slot's expert outputs ``ys[d]``
    (``[L, S * C, H]``, same layout as ``recv_x``); ``None`` for a slot that sends nothing.
    Rows nobody sends stay zero."""
    ref_y = next(y for y in ys if y is not None)
    rows = torch.zeros(num_tokens * topk, ref_y.shape[-1], dtype=ref_y.dtype)
    for d, y in enumerate(ys):
        if y is None:
            continue
        for le in range(y.shape[0]):
            n = int(recvs[d].recv_m[le, src])
            lo = src * max_tokens
            idx = recvs[d].recv_src_idx[le, lo : lo + n].long()
            rows[idx] = y[le, lo : lo + n].cpu()
    return rows.view(num_tokens, topk, ref_y.shape[-1])


def combine_ref(
    rows: torch.Tensor,
    topk_phy: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_ok: torch.Tensor,
    experts_per_slot: int,
) -> torch.Tensor:
    """Weighted sum ``[T, H]`` of the returned rows ``[T, K, H]``, in ``k`` order, in float32,
    one rounding per multiply and per add (the kernel uses ``mul_rn``/``add_rn`` to match).

    Entries whose physical expert is ``-1`` or on a slot with ``slot_ok[slot] == False`` (dead
    or suspect) are dropped, not renormalised."""
    num_tokens, topk, hidden = rows.shape
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=rows.device)
    phy = topk_phy.long()
    for k in range(topk):
        ok = (phy[:, k] >= 0) & slot_ok.bool()[phy[:, k].clamp(min=0) // experts_per_slot]
        prod = topk_weights[:, k : k + 1].float() * rows[:, k].float()
        acc = torch.where(ok[:, None], acc + prod, acc)
    return acc.to(rows.dtype)


def grouped_swiglu_ref(
    x: torch.Tensor,
    group_m: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    groups_per_expert: int = 1,
) -> torch.Tensor:
    """SwiGLU expert MLP over groups of rows: ``x`` ``[G, C, H]``, ``group_m`` ``[G]`` int32 valid
    rows per group, group ``g`` uses expert ``g // groups_per_expert`` of ``w13`` ``[E, 2I, H]``
    (gate rows then up rows) and ``w2`` ``[E, H, I]``. Returns ``[G, C, H]``, zero past
    ``group_m``. Accumulates in float32; the hidden activation is rounded to ``x.dtype``."""
    inter = w2.shape[2]
    y = torch.zeros_like(x)
    for g in range(x.shape[0]):
        e, n = g // groups_per_expert, int(group_m[g])
        a = x[g, :n].float()
        gate_up = a @ w13[e].float().T
        h = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x.dtype).float()
        y[g, :n] = (h @ w2[e].float().T).to(x.dtype)
    return y
