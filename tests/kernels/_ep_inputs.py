"""Deterministic EP inputs: every rank can rebuild every other rank's inputs from the seed."""

from __future__ import annotations

import torch


def make_inputs(
    seed: int,
    tokens: list[int],
    num_slots: int,
    experts_per_slot: int,
    hidden: int,
    topk: int,
    dtype: torch.dtype,
    dead: frozenset[int] = frozenset(),
):
    """Per rank: rows ``[T, H]``, distinct physical experts on live slots ``[T, K]`` int32
    (the first token's last choice dropped: ``-1``), weights ``[T, K]`` float32. On the CPU."""
    gen = torch.Generator().manual_seed(seed)
    live = [p for p in range(num_slots * experts_per_slot) if p // experts_per_slot not in dead]
    live_phy = torch.tensor(live, dtype=torch.int32)
    xs, phys, ws = [], [], []
    for t in tokens:
        keys = torch.rand(t, len(live), generator=gen)
        phy = live_phy[keys.argsort(dim=1)[:, :topk]]
        if t:
            phy[0, -1] = -1
        xs.append(torch.randn(t, hidden, generator=gen).to(dtype))
        phys.append(phy.contiguous())
        ws.append(torch.rand(t, topk, generator=gen))
    return xs, phys, ws
