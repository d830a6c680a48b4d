"""Worker processes for the nccl (gloo) fabric tests (spawned: importable by name).

Every worker runs the same rounds (the inputs of ``_shm_workers``) through the shm fabric with
checks on, the shm fabric with checks off and the nccl fabric, and reports all three.
"""

from __future__ import annotations

import os
import signal
import time

from eep.fabrics.base import ExchangeFailed
from eep.fabrics.nccl import CollectiveFailed, MembershipFixed, NcclFabric
from eep.fabrics.shm import ShmFabric

from ._shm_workers import CFG, exchange


def _shm_rounds(cluster, slot, members, rounds, barrier, elastic):
    fabric = ShmFabric(cluster, slot, 1, CFG, elastic=elastic)
    barrier.wait(timeout=60)
    fabric.apply_view(1, {s: 1 for s in members})
    try:
        return [exchange(fabric, r).numpy() for r in range(rounds)]
    finally:
        barrier.wait(timeout=60)  # nobody unlinks a segment a peer still reads
        fabric.close()


def compare_worker(cluster, store_addr, slot, members, rounds, victim, barrier, results):
    """The three fabrics on the same rounds; then ``victim`` SIGKILLs itself and the others
    try one more nccl exchange, which must fail with a typed error."""
    torch_threads_one()
    out = {
        "shm": _shm_rounds(f"{cluster}a", slot, members, rounds, barrier, elastic=True),
        "shm_unchecked": _shm_rounds(f"{cluster}b", slot, members, rounds, barrier, False),
    }
    fabric = NcclFabric(slot, CFG, store_addr=store_addr)
    try:
        fabric.apply_view(1, {s: 1 for s in members[:-1]})
        out["refused_partial_view"] = False
    except MembershipFixed:
        out["refused_partial_view"] = True
    fabric.apply_view(1, {s: 1 for s in members})
    out["nccl"] = [exchange(fabric, r).numpy() for r in range(rounds)]
    if slot == victim:
        _put_and_flush(results, (slot, out))
        os.kill(os.getpid(), signal.SIGKILL)
    started = time.monotonic()
    try:
        exchange(fabric, rounds)
        out["after_kill"] = "completed"
    except CollectiveFailed:
        out["after_kill"] = "collective_failed"
    except ExchangeFailed:
        out["after_kill"] = "exchange_failed"
    out["after_kill_s"] = time.monotonic() - started
    _put_and_flush(results, (slot, out))
    os._exit(0)  # a broken group's teardown may block; the result is already out


def _put_and_flush(results, item) -> None:
    results.put(item)
    results.close()
    results.join_thread()


def torch_threads_one() -> None:
    import torch

    torch.set_num_threads(1)  # four ranks on two cores
