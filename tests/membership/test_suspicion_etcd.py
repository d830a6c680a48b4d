"""Suspicion against a real etcd and a real coordinator (in this process, so its quarantine is
short): members that keep their leases but ask for a resync naming suspects get a plain resync
first, then, asking again in that view, the suspected side is excluded; a slot so excluded is
not re-admitted during its quarantine, even as a new incarnation, and is once it is over."""

from __future__ import annotations

import threading
from contextlib import ExitStack

from eep.membership.commit import read_history
from eep.membership.coordinator import Coordinator, CoordinatorConfig
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.registry import SlotRegistration, SlotState
from eep.membership.session import Session, SessionConfig

TTL = 2
QUARANTINE_S = 3.0
# two hosts of two slots each, cut from each other: each side suspects the other
CUT = {0: [2, 3], 1: [2, 3], 2: [0, 1], 3: [0, 1]}


def _join(stack: ExitStack, etcd, keys: Keys, slot: int) -> SlotRegistration:
    session = stack.enter_context(Session(etcd, SessionConfig(ttl_s=TTL)))
    reg = SlotRegistration(etcd, keys, session, slot)
    reg.register(wait_s=10)
    reg.update(SlotState.READY)
    return reg


def test_a_persistent_cut_is_resynced_once_then_excluded_and_quarantined(
    etcd, etcd_server, cluster, watcher
):
    keys = Keys(cluster)
    config = CoordinatorConfig(
        ttl_s=TTL, debounce_s=0.05, suspect_quarantine_s=QUARANTINE_S, suspect_collect_s=1.0
    )
    client = EtcdClient(etcd_server.endpoint)
    coordinator = Coordinator(client, keys, config=config)
    leader = threading.Thread(target=coordinator.run, name="coordinator", daemon=True)
    leader.start()
    try:
        with ExitStack() as stack:
            regs = {s: _join(stack, etcd, keys, s) for s in range(4)}
            view = watcher.wait_for(lambda v: v.members == (0, 1, 2, 3), timeout_s=30)
            assert view is not None, f"no view of the four slots; latest {watcher.latest}"
            epoch = view.epoch

            # round 1: every member asks, naming the other side; a plain resync answers
            for s, reg in regs.items():
                reg.update(resync_epoch=epoch, suspects=CUT[s])
            resync = watcher.wait_for(lambda v: v.epoch > epoch, timeout_s=20)
            assert resync is not None and resync.epoch == epoch + 1, watcher.latest
            assert resync.incarnations == view.incarnations, resync
            assert resync.reason.startswith("resync asked by"), resync.reason

            # round 2: the same again in the resync's view; the side without slot 0 is excluded
            for s, reg in regs.items():
                reg.update(resync_epoch=resync.epoch, suspects=CUT[s])
            cut = watcher.wait_for(lambda v: v.epoch > resync.epoch, timeout_s=20)
            assert cut is not None and cut.epoch == resync.epoch + 1, watcher.latest
            assert cut.members == (0, 1), cut
            assert cut.reason.startswith("excluded by suspicion: [2, 3]"), cut.reason

            # slot 2 restarts as a new incarnation, ready within its quarantine; slot 3's old
            # incarnation stays registered (as if it never saw the view that excluded it)
            regs[2].session.close(revoke=True)
            fresh = _join(stack, etcd, keys, 2)
            assert fresh.record.incarnation > view.incarnation(2)
            assert fresh.record.registered_at < cut.committed_at + QUARANTINE_S, (
                "the re-registration came after the quarantine: nothing was tested"
            )
            back = watcher.wait_for(lambda v: 2 in v.members, timeout_s=QUARANTINE_S + 20)
            assert back is not None, f"slot 2 never re-admitted; latest {watcher.latest}"
            assert back.incarnation(2) == fresh.record.incarnation and back.members == (0, 1, 2)
            assert back.committed_at - cut.committed_at >= QUARANTINE_S - 0.2, (
                f"re-admitted {back.committed_at - cut.committed_at:.2f} s after the exclusion"
            )
            after = [v for v in read_history(etcd, keys) if v.epoch > cut.epoch]
            assert after and after[0].epoch == back.epoch  # nothing committed in between
            assert all(3 not in v.members for v in after)  # the excluded incarnation stays out
    finally:
        coordinator.stop()
        leader.join(timeout=15)
        client.close()
    assert not leader.is_alive(), "the coordinator did not stop"
