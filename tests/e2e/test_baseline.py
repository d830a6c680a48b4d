"""The full-restart baseline (``eep launch --baseline``): one torchrun over every slot, so a
worker SIGKILLed mid-decode makes torchrun restart every slot (each with a new incarnation),
and every request still completes with the single-process result once the new view is in."""

from __future__ import annotations

import pytest

from eep.tools import faults

from .conftest import load_with_faults, start_cluster

pytestmark = pytest.mark.slow

SLOTS = 4


@pytest.fixture
def cluster(tiny_model_dir, tmp_path):
    c = start_cluster(tiny_model_dir, tmp_path, torchrun=True, slots=SLOTS, baseline=True)
    yield c
    c.stop()


def test_a_killed_worker_restarts_every_slot_and_loses_no_request(cluster, tiny_model_dir):
    before = cluster.watcher.latest
    assert len(before.members) == SLOTS

    def kill_and_restart_all(load):
        fault = faults.inject(cluster, 2)
        faults.wait_excluded(cluster, fault)
        faults.wait_requeued(cluster.url, fault)
        back = cluster.watcher.wait_for(
            lambda v: (
                len(v.members) == SLOTS
                and all(v.incarnation(s) > before.incarnation(s) for s in range(SLOTS))
            ),
            timeout_s=180,
        )
        assert back is not None, "not every slot came back with a new incarnation"
        # the full restart stops every slot: no token need flow until it is back
        return faults.prove(fault, None, cluster.url)

    fault = load_with_faults(
        cluster, tiny_model_dir, kill_and_restart_all, streams=8, max_tokens=24
    )
    assert fault.requeued >= 1
    assert cluster.procs["slots"].poll() is None, "the torchrun agent gave up"
