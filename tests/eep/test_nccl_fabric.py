"""The nccl fabric (gloo on CPU) between real processes: the same results as the shm fabric,
bit for bit; the shm fabric with checks off gives the same results as with checks on."""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import uuid

import pytest
import torch

from eep.fabrics.shm import remove_segments

from . import _nccl_workers as nw
from . import _shm_workers as w

MEMBERS, ROUNDS, VICTIM = (0, 1, 2, 3), 5, 3


def _free_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _collect(procs, results, count: int, timeout_s: float) -> list:
    out = []
    try:
        for _ in range(count):
            out.append(results.get(timeout=timeout_s))
    except queue.Empty:
        pytest.fail(f"workers did not report within {timeout_s} s: got {len(out)} of {count}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return out


@pytest.fixture(scope="module")
def three_fabrics():
    """``{slot: {"shm": [...], "shm_unchecked": [...], "nccl": [...], ...}}`` of one run
    (one set of processes for every test here: spawning four torch processes is the cost)."""
    cluster, addr = f"t{uuid.uuid4().hex[:8]}", _free_addr()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(MEMBERS)), ctx.Queue()
    procs = [
        ctx.Process(
            target=nw.compare_worker,
            args=(cluster, addr, slot, MEMBERS, ROUNDS, VICTIM, barrier, results),
        )
        for slot in MEMBERS
    ]
    for p in procs:
        p.start()
    try:
        return dict(_collect(procs, results, len(MEMBERS), timeout_s=90))
    finally:
        remove_segments(f"{cluster}a")
        remove_segments(f"{cluster}b")


def test_nccl_fabric_between_four_processes_equals_the_shm_fabric_exactly(three_fabrics):
    for slot, out in three_fabrics.items():
        assert len(out["nccl"]) == ROUNDS
        for r, (got, shm) in enumerate(zip(out["nccl"], out["shm"], strict=True)):
            got, shm = torch.from_numpy(got), torch.from_numpy(shm)
            assert torch.equal(got, shm), (slot, r)
            assert torch.equal(got, w.reference(slot, r, MEMBERS)), (slot, r)


def test_shm_fabric_with_checks_off_gives_the_results_of_checks_on(three_fabrics):
    for slot, out in three_fabrics.items():
        for r, (off, on) in enumerate(zip(out["shm_unchecked"], out["shm"], strict=True)):
            assert torch.equal(torch.from_numpy(off), torch.from_numpy(on)), (slot, r)


def test_nccl_fabric_refuses_a_view_without_every_slot(three_fabrics):
    assert all(out["refused_partial_view"] for out in three_fabrics.values())


def test_nccl_survivors_fail_with_a_typed_error_when_a_peer_is_killed(three_fabrics):
    survivors = {s: out for s, out in three_fabrics.items() if s != VICTIM}
    assert sorted(survivors) == [s for s in MEMBERS if s != VICTIM]
    # bounded by the fabric's timeout_s or an earlier connection reset; no speed asserted
    outcomes = {s: out["after_kill"] for s, out in survivors.items()}
    assert set(outcomes.values()) == {"collective_failed"}, outcomes
