"""The te fabric between real processes on two "hosts" (host ids) over a real Mooncake
Transfer Engine on loopback: exact results, remote writes counted, a SIGKILLed remote peer."""

from __future__ import annotations

import multiprocessing as mp
import queue
import tempfile
import uuid

import pytest
import torch

from eep.fabrics.shm import remove_segments

from . import _shm_workers as ref
from . import _te_workers as w

pytest.importorskip("mooncake.engine", reason="the Mooncake Transfer Engine is not installed")


def _run(members, rounds, die=None, second=None, timeout_s=120):
    cluster = f"t{uuid.uuid4().hex[:8]}"
    root = tempfile.mkdtemp(prefix="eep-te-")
    ctx = mp.get_context("spawn")
    survivors = [s for s in members if not die or s != die[0]]
    # two waits: start (every member), end (survivors only: the dead one never arrives)
    start, end, results = ctx.Barrier(len(members)), ctx.Barrier(len(survivors)), ctx.Queue()
    procs = []
    for slot in members:
        die_at = die[1] if die and die[0] == slot else None
        procs.append(
            ctx.Process(
                target=_entry,
                args=(cluster, root, slot, members, rounds, start, end, results, die_at, second),
            )
        )
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in survivors:
            slot, events = results.get(timeout=timeout_s)
            out[slot] = events
    except queue.Empty:
        pytest.fail(f"workers did not report within {timeout_s} s: got {sorted(out)}")
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
        remove_segments(cluster)
    return out


def _entry(cluster, root, slot, members, rounds, start, end, results, die_at, second):
    class _Two:
        """The worker's one barrier object, waited on twice: at the start, at the end."""

        def __init__(self):
            self.n = 0

        def wait(self, timeout):
            self.n += 1
            return (start if self.n == 1 else end).wait(timeout)

    w.worker(cluster, root, slot, members, rounds, _Two(), results, die_at, second)


def test_exchanges_across_two_hosts_equal_the_reference_and_go_through_the_engine():
    members = (0, 1, 2, 3)
    out = _run(members, rounds=5)
    for slot, events in out.items():
        *rounds, stats = events
        assert [e[0] for e in rounds] == ["ok"] * 5, rounds
        for _, r, got in rounds:
            assert torch.equal(torch.from_numpy(got), ref.reference(slot, r, members)), (slot, r)
        # the other host's two slots were written to through the engine, twice per round
        assert stats[3] == [s for s in members if w.host_of(s) != w.host_of(slot)]
        assert stats[2]["remote_posts"] == 5 * 2 * 2, stats
        assert stats[2]["abandoned"] == 0


def test_a_killed_remote_peer_is_suspected_and_the_next_view_exchanges_without_it():
    members = (0, 1, 2, 3)
    out = _run(members, rounds=6, die=(3, 3), second=(0, 1, 2))
    for slot in (0, 1, 2):
        events = out[slot]
        kinds = [e[0] for e in events]
        assert kinds[:3] == ["ok"] * 3, events
        assert events[3][0] == "failed" and events[3][2] == ("timeout", (3,)), events[3]
        assert events[4][0] == "recovered_after_s"
        assert kinds[5:7] == ["ok"] * 2, events
        for _, r, got in events[5:7]:
            assert torch.equal(torch.from_numpy(got), ref.reference(slot, r, (0, 1, 2)))


def test_the_digest_of_a_post_changes_with_its_tag_count_indices_and_rows():
    from eep.fabrics.te import digest

    meta = torch.arange(12, dtype=torch.int32).view(4, 3)
    rows = torch.randn(4, 8, dtype=torch.float64)
    base = digest(7, meta, rows)
    assert digest(7, meta.clone(), rows.clone()) == base
    assert digest(8, meta, rows) != base  # a late write of an older exchange
    assert digest(7, meta[:3], rows[:3]) != base  # a stale count
    changed = rows.clone()
    changed[2, 5] += 1e-12
    assert digest(7, meta, changed) != base
    swapped = meta.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert digest(7, swapped, rows) != base
    assert 0 <= base < 1 << 63
