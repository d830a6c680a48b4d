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


def compare_worker(cluster, store_addr, slot, members, rounds, barrier, results):
    torch_threads_one()
    out = {
        "shm": _shm_rounds(f"{cluster}a", slot, members, rounds, barrier, elastic=True),
        "shm_unchecked": _shm_rounds(f"{cluster}b", slot, members, rounds, barrier, False),
    }
    fabric = NcclFabric(slot, CFG, store_addr=store_addr)
    try:
        refused = False
        try:
            fabric.apply_view(1, {s: 1 for s in members[:-1]})
        except MembershipFixed:
            refused = True
        fabric.apply_view(1, {s: 1 for s in members})
        out["nccl"] = [exchange(fabric, r).numpy() for r in range(rounds)]
        out["refused_partial_view"] = refused
    finally:
        fabric.close()
    results.put((slot, out))


def kill_worker(store_addr, slot, members, victim, results):
    """Two rounds, then ``victim`` SIGKILLs itself; survivors must fail with a typed error."""
    torch_threads_one()
    fabric = NcclFabric(slot, CFG, store_addr=store_addr)
    fabric.apply_view(1, {s: 1 for s in members})
    for r in range(2):
        exchange(fabric, r)
    if slot == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    started = time.monotonic()
    try:
        exchange(fabric, 2)
        outcome = "completed"
    except CollectiveFailed:
        outcome = "collective_failed"
    except ExchangeFailed:
        outcome = "exchange_failed"
    results.put((slot, outcome, time.monotonic() - started))
    results.close()
    results.join_thread()  # flushed before the hard exit below
    os._exit(0)  # a broken group's teardown may block; the result is already queued


def torch_threads_one() -> None:
    import torch

    torch.set_num_threads(1)  # four ranks on two cores
