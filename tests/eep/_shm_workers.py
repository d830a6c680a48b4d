"""Worker processes for the shm fabric tests (spawned: importable by name)."""

from __future__ import annotations

import os
import signal
import time

import torch

from eep.fabrics.base import ExchangeFailed, FabricConfig
from eep.fabrics.shm import ShmFabric

CFG = FabricConfig(
    num_slots=4,
    experts_per_slot=2,
    hidden=8,
    topk=2,
    max_tokens=6,
    dtype=torch.float32,
    exchange_timeout_s=2.0,
)


def inputs(slot: int, round_: int, members: tuple[int, ...]):
    """Deterministic tokens and routes of one slot in one round, over live members only."""
    gen = torch.Generator().manual_seed(1000 * round_ + slot)
    num_tokens = int(torch.randint(0, CFG.max_tokens + 1, (1,), generator=gen))
    x = torch.randn(num_tokens, CFG.hidden, generator=gen)
    live_phy = torch.tensor([s * CFG.experts_per_slot + e for s in members for e in range(2)])
    pick = torch.randint(0, len(live_phy), (num_tokens, CFG.topk), generator=gen)
    weights = torch.rand(num_tokens, CFG.topk, generator=gen)
    return x, live_phy[pick], weights


def expert(phy: int, x: torch.Tensor) -> torch.Tensor:
    return x * (phy + 1) - 0.5


def reference(slot: int, round_: int, members: tuple[int, ...]) -> torch.Tensor:
    x, phy, w = inputs(slot, round_, members)
    per_k = torch.zeros(x.shape[0] * CFG.topk, CFG.hidden)
    for i, p in enumerate(phy.view(-1).tolist()):
        per_k[i] = expert(p, x[i // CFG.topk])
    return (per_k.view(-1, CFG.topk, CFG.hidden) * w.view(-1, CFG.topk, 1)).sum(dim=1)


def exchange(fabric: ShmFabric, round_: int) -> torch.Tensor:
    x, phy, w = inputs(fabric.slot, round_, fabric.members)
    recv, handle = fabric.dispatch(x, phy, w)
    y = torch.empty_like(recv.x)
    for i in range(recv.x.shape[0]):
        y[i] = expert(fabric.slot * CFG.experts_per_slot + int(recv.local_expert[i]), recv.x[i])
    return fabric.combine(y, handle)


def rounds_of(fabric, rounds, die_at=None, second_view=None) -> list[tuple]:
    """``rounds`` exchanges in view 1; SIGKILL itself at round ``die_at``; after a failed
    exchange, apply view 2 (``second_view``'s slots) once and go on, or stop without one."""
    out = []
    for r in range(rounds):
        if die_at == r:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            out.append(("ok", r, exchange(fabric, r).numpy()))  # numpy: pickled by value
        except ExchangeFailed as exc:
            started = time.monotonic()
            out.append(("failed", r, (exc.reason.value, exc.suspects)))
            if second_view is None:
                break
            fabric.apply_view(2, {s: 1 for s in second_view})
            out.append(("recovered_after_s", r, time.monotonic() - started))
            second_view = None
    return out


def worker(cluster, slot, members, rounds, barrier, results, die_at=None, second_view=None):
    fabric = ShmFabric(cluster, slot, 1, CFG)
    barrier.wait(timeout=60)
    fabric.apply_view(1, {s: 1 for s in members})
    results.put((slot, rounds_of(fabric, rounds, die_at, second_view)))
    fabric.close()
