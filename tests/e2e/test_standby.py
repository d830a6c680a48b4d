"""A warm standby worker per slot (eep.rank.standby): the worker that replaces a killed one is
the standby process that was started, and idle, before the kill; it serves the slot's share
again, and a new standby is started behind it. Under live load, nothing lost."""

from __future__ import annotations

import os
import time

import pytest

from eep.tools import faults

from .conftest import kill_and_recover, load_with_faults, start_cluster

pytestmark = pytest.mark.slow

SLOT = 2


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = start_cluster(tiny_model_dir, tmp_path_factory.mktemp("standby"), torchrun=False)
    yield c
    c.stop()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def _standby_pid(cluster, slot: int, timeout_s: float = 120.0) -> int:
    """The pid of ``slot``'s standby: the supervisor's child started with ``"standby": true``
    that is not the slot's worker (a promoted standby keeps its command line), once a standby
    waits to be promoted (its log says so)."""
    supervisor = cluster.procs[f"slot{slot}"].pid
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker = cluster.worker_pid(slot)
        for pid in _children(supervisor):
            if pid == worker:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b'"standby": true' not in f.read():
                        continue
            except OSError:
                continue
            if faults.standby_waiting(cluster.workdir, slot):
                return pid
        time.sleep(0.1)
    raise AssertionError(f"slot {slot} has no warm standby after {timeout_s} s")


def test_a_killed_worker_is_replaced_by_its_warm_standby(cluster, tiny_model_dir):
    standby = _standby_pid(cluster, SLOT)
    fault = load_with_faults(cluster, tiny_model_dir, kill_and_recover(cluster, SLOT))
    assert fault.requeued >= 1
    promoted = cluster.wait_worker_pid(SLOT)
    assert promoted == standby, "the new worker is not the standby that was waiting"
    # on the CPU the standby staged its rank (standby_stage), and the promoted worker used it
    incarnation = cluster.watcher.latest.incarnation(SLOT)
    events = faults.worker_events(cluster, SLOT, incarnation)
    (started,) = [e for e in events if e["event"] == "worker_started"]
    assert started["staged"] is True
    print(f"kill -> rejoined with the standby: {fault.rejoined_at - fault.at:.2f} s")
    # and a new standby waits behind the promoted worker
    behind = _standby_pid(cluster, SLOT)
    assert behind not in (standby, fault.pid)


def test_without_standbys_a_cold_worker_replaces_the_killed_one(tiny_model_dir, tmp_path):
    from eep.launcher import Cluster

    class Cold(Cluster):
        def __init__(self, opts):
            opts.standby = False
            super().__init__(opts)

    c = start_cluster(tiny_model_dir, tmp_path, torchrun=False, slots=2, cluster_type=Cold)
    try:
        supervisor = c.procs["slot1"].pid
        worker = c.wait_worker_pid(1)
        assert _children(supervisor) == [worker], "a standby was started with standbys off"
        os.kill(worker, 9)
        back = c.watcher.wait_for(lambda v: (v.incarnation(1) or 0) > 1, 120)
        assert back is not None
        assert faults.process_pid(c, 1, "worker") != worker
        assert not [n for n in os.listdir(c.workdir) if ".standby" in n]
    finally:
        c.stop()
