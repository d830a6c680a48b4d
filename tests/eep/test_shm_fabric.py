"""The shm fabric between real processes: exact results, a SIGKILLed peer, a newer view."""

from __future__ import annotations

import multiprocessing as mp
import queue
import uuid

import pytest
import torch

from eep.fabrics.shm import remove_segments

from . import _shm_workers as w


def _run(members, rounds, die=None, second_view=None, timeout_s=90):
    cluster = f"t{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(members)), ctx.Queue()
    procs = []
    for slot in members:
        die_at = die[1] if die and die[0] == slot else None
        args = (cluster, slot, members, rounds, barrier, results, die_at, second_view)
        procs.append(ctx.Process(target=w.worker, args=args))
    for p in procs:
        p.start()
    survivors = [s for s in members if not die or s != die[0]]
    out = {}
    try:
        for _ in survivors:
            slot, events = results.get(timeout=timeout_s)
            out[slot] = events
    except queue.Empty:
        pytest.fail(f"workers did not report within {timeout_s} s: got {sorted(out)}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        remove_segments(cluster)
    return out


def test_dispatch_and_combine_between_four_processes_equal_the_reference():
    members = (0, 1, 2, 3)
    out = _run(members, rounds=5)
    for slot, events in out.items():
        assert [e[0] for e in events] == ["ok"] * 5, events
        for _, r, got in events:
            assert torch.equal(torch.from_numpy(got), w.reference(slot, r, members)), (slot, r)


def test_survivors_flag_a_killed_peer_and_keep_exchanging_in_the_next_view():
    members = (0, 1, 2)
    out = _run(members, rounds=6, die=(1, 3), second_view=(0, 2))
    for slot in (0, 2):
        events = out[slot]
        kinds = [e[0] for e in events]
        assert kinds[:3] == ["ok"] * 3
        assert events[3][0] == "failed" and events[3][2] == ("timeout", (1,)), events[3]
        assert events[4][0] == "recovered_after_s"
        assert kinds[5:] == ["ok"] * 2  # rounds 4 and 5 with slot 1 gone
        for _, r, got in events[5:]:
            assert torch.equal(torch.from_numpy(got), w.reference(slot, r, (0, 2)))


def test_make_fabric_builds_a_fabric_and_refuses_a_wrong_device():
    from eep.fabrics.base import Fabric, FabricMember
    from eep.fabrics.factory import make_fabric

    cluster = f"t{uuid.uuid4().hex[:8]}"
    fabric = make_fabric("shm", w.CFG, FabricMember(cluster, 0, 1))
    try:
        assert isinstance(fabric, Fabric) and not fabric.graph_safe
        assert fabric.export() is None
        fabric.warm_up(lambda: pytest.fail("shm cannot step alone"))  # nothing to warm
        fabric.apply_view(1, {0: 1})
        assert fabric.peers_started() is False  # it can tell: no peer has started
    finally:
        fabric.close()
        remove_segments(cluster)
    with pytest.raises(ValueError, match="runs on the CPU"):
        make_fabric("shm", w.CFG, FabricMember(cluster, 0, 1, device="cuda:0"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_fabric("symm", w.CFG, FabricMember(cluster, 0, 1, peer_info=lambda s, i: None))
    with pytest.raises(ValueError, match="unknown fabric"):
        make_fabric("rdma", w.CFG, FabricMember(cluster, 0, 1))
