"""Sessions, registration, fencing and the view watcher against a real etcd."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from eep.membership.commit import commit_next
from eep.membership.errors import EtcdUnavailable, Fenced, LeaseLost, SlotTaken
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.registry import SlotRegistration, SlotState, revoke_slot
from eep.membership.session import Session, SessionConfig
from eep.membership.view import View
from eep.membership.watcher import ViewWatcher


def _commit(etcd, keys, members):
    def decide(cur):
        incs = {s: 1 for s in members}
        if cur is None:
            return View(1, tuple(members), tuple(incs.items()))
        return cur.next(incs, None, f"members {members}")

    return commit_next(etcd, keys, decide).view


def test_incarnations_increase_across_registrations(etcd, cluster):
    keys = Keys(cluster)
    seen = []
    for _ in range(3):
        with Session(etcd, SessionConfig(ttl_s=2)) as session:
            reg = SlotRegistration(etcd, keys, session, slot=4)
            seen.append(reg.register().incarnation)
            assert etcd.get(keys.slot(4)).lease == session.lease_id
        assert etcd.get(keys.slot(4)) is None  # close() revoked the lease and its key
    assert seen == [1, 2, 3]


def test_a_held_slot_is_refused_with_the_holders_pid(etcd, cluster):
    keys = Keys(cluster)
    with Session(etcd) as first, Session(etcd) as second:
        SlotRegistration(etcd, keys, first, slot=0).register()
        started = time.monotonic()
        with pytest.raises(SlotTaken, match=r"held by pid \d+"):
            SlotRegistration(etcd, keys, second, slot=0).register(wait_s=0.3)
        # bounded by the 0.3 s asked, not the default 30 s (generous: a busy host is slow)
        assert time.monotonic() - started < 10


def test_a_registration_waits_for_a_revoked_predecessor(etcd, cluster):
    keys = Keys(cluster)
    with Session(etcd) as first, Session(etcd) as second:
        SlotRegistration(etcd, keys, first, slot=1).register()
        threading.Timer(0.3, revoke_slot, args=(etcd, keys, 1)).start()
        record = SlotRegistration(etcd, keys, second, slot=1).register(wait_s=5)
        assert record.incarnation == 2 and record.lease_id == second.lease_id


def test_a_registration_cannot_be_updated_after_its_lease_is_revoked(etcd, cluster):
    keys = Keys(cluster)
    with Session(etcd, SessionConfig(ttl_s=2)) as session:
        reg = SlotRegistration(etcd, keys, session, slot=2)
        reg.register()
        assert reg.update(SlotState.READY).state is SlotState.READY
        etcd.lease_revoke(session.lease_id)
        with pytest.raises(LeaseLost):
            reg.update(SlotState.READY)
        assert etcd.get(keys.slot(2)) is None


def test_a_session_whose_owner_stalls_stops_renewing_and_fences(etcd):
    frozen = [0]
    session = Session(
        etcd, SessionConfig(ttl_s=1, margin_s=0.2, stall_s=0.3), progress=lambda: frozen[0]
    ).open()
    try:
        assert session.done.wait(timeout=5), "a stalled owner kept its lease"
        with pytest.raises(LeaseLost):
            session.check()
        assert isinstance(session.loss, LeaseLost)
        deadline = time.monotonic() + 5
        while etcd.lease_ttl(session.lease_id) >= 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert etcd.lease_ttl(session.lease_id) == -1
    finally:
        session.close()


def test_a_session_that_moves_keeps_its_lease(etcd):
    counter = [0]
    session = Session(etcd, SessionConfig(ttl_s=1, margin_s=0.2), progress=lambda: counter[0])
    with session:
        for _ in range(30):
            counter[0] += 1
            time.sleep(0.1)
        session.check()
        assert etcd.lease_ttl(session.lease_id) >= 0


class _StallingProxy:
    """A TCP relay to etcd that can go silent: while ``stalled``, every connection (new or
    open) stops relaying, and a connection that saw a stall never answers again (a dead
    connection, as a lost packet stream looks to a client)."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.stalled = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            dead = threading.Event()
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst, dead), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, dead: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if self.stalled.is_set():
                    dead.set()
                if not dead.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_a_renewal_stalled_on_a_dead_connection_is_retried_before_the_fence(etcd_server):
    """The client's timeout (2 s) is longer than the slack a TTL of 3 s leaves (2.7 s after the
    last renewal): a keepalive stuck on a dead connection for the whole timeout would fence a
    healthy owner. Renewals are bounded by half the renewal interval and retried."""
    proxy = _StallingProxy(etcd_server.endpoint)
    client = EtcdClient(proxy.endpoint, timeout_s=2.0)
    session = Session(client, SessionConfig(ttl_s=3, margin_s=0.3)).open()
    try:
        time.sleep(0.8)  # the first renewal is due at 1 s: it meets the stall
        proxy.stalled.set()
        time.sleep(0.9)
        proxy.stalled.clear()
        until = time.monotonic() + 4
        while time.monotonic() < until:
            session.check()  # raises Fenced if no renewal landed in time
            time.sleep(0.05)
        assert client.lease_ttl(session.lease_id) > 0
    finally:
        session.close()
        client.close()
        proxy.close()


class _SlowGrant(EtcdClient):
    """A client whose lease grants answer late (a loaded host, an etcd just back)."""

    def lease_grant(self, *args, **kwargs):
        granted = super().lease_grant(*args, **kwargs)
        time.sleep(1.8)
        return granted


def test_a_slow_grant_does_not_push_the_first_renewal_past_the_fence(etcd_server):
    """The fence deadline counts from when the grant was sent (2.7 s at TTL 3); the first
    renewal must too. Counted from the grant's answer (1.8 s late) it would come at 2.8 s,
    after the deadline, and fence a healthy owner (seen on a re-attach under load)."""
    client = _SlowGrant(etcd_server.endpoint)
    session = Session(client, SessionConfig(ttl_s=3, margin_s=0.3)).open()
    try:
        until = time.monotonic() + 3
        while time.monotonic() < until:
            session.check()  # raises Fenced if the first renewal came too late
            time.sleep(0.05)
        assert client.lease_ttl(session.lease_id) > 0
    finally:
        session.close()
        client.close()


def test_the_fence_deadline_is_checked_on_the_local_clock(etcd):
    with Session(etcd, SessionConfig(ttl_s=2, margin_s=0.5)) as session:
        session._last_renewal -= 5  # as if the process had been frozen for 5 s
        with pytest.raises(Fenced):
            session.check()


def test_the_watcher_ends_on_the_latest_view_after_a_compaction(etcd_fresh, cluster):
    etcd = EtcdClient(etcd_fresh.endpoint)
    keys = Keys(cluster)
    _commit(etcd, keys, [0, 1, 2])
    delivered = []
    watcher = ViewWatcher(etcd, keys, on_view=lambda v: delivered.append(v.epoch), retry_s=3.0)
    watcher.start()
    try:
        assert watcher.wait_for(lambda v: v.epoch == 1, timeout_s=10)
        etcd_fresh.restart()  # the stream breaks; the watcher waits retry_s before resuming
        for members in ([0, 1], [0], [0, 2], [0, 1, 2]):
            _commit(etcd, keys, members)
        etcd.compact(etcd.revision())
        latest = watcher.wait_for(lambda v: v.epoch == 5, timeout_s=15)
        assert latest is not None and latest.members == (0, 1, 2)
        assert delivered == [1, 2, 3, 4, 5]
        assert watcher.resumes >= 1
    finally:
        watcher.stop()
        etcd.close()


def test_the_watcher_skips_a_malformed_view_and_delivers_the_next(etcd, cluster):
    keys = Keys(cluster)
    _commit(etcd, keys, [0])
    with ViewWatcher(etcd, keys) as watcher:
        assert watcher.wait_for(lambda v: v.epoch == 1, timeout_s=5)
        etcd.put(keys.view, "{garbage")
        _commit(etcd, keys, [0, 1])  # builds on the history's epoch 1, over the garbage
        latest = watcher.wait_for(lambda v: v.epoch == 2, timeout_s=5)
        assert latest is not None and latest.members == (0, 1)


def test_the_watcher_never_goes_back_to_an_older_epoch(etcd, cluster):
    keys = Keys(cluster)
    for members in ([0], [0, 1], [0, 1, 2]):
        _commit(etcd, keys, members)
    with ViewWatcher(etcd, keys) as watcher:
        assert watcher.wait_for(lambda v: v.epoch == 3, timeout_s=5)
        etcd.put(keys.view, View(2, (0,), ((0, 1),)).to_json())  # a stale writer
        time.sleep(0.5)
        assert watcher.latest.epoch == 3
        assert [watcher.next(1).epoch] == [3]
        assert watcher.next(0.2) is None


def test_an_unreachable_etcd_is_a_clear_error_in_bounded_time():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable, match="etcdctl --endpoints"):
        Session(EtcdClient(f"127.0.0.1:{dead_port}", timeout_s=1.0)).open()
    assert time.monotonic() - started < 15  # bounded, not hung (generous: a busy host)


def test_a_silent_etcd_endpoint_times_out_instead_of_hanging():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        client = EtcdClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
            client.get("/eep/x/view")
        assert time.monotonic() - started < 15  # bounded, not hung (generous: a busy host)


def test_the_coordinator_command_exits_with_a_message_when_etcd_is_down():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "eep.tools.cli", "coordinator", "--etcd", f"127.0.0.1:{dead_port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "Check that etcd runs" in proc.stderr
