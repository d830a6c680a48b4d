"""Riding out an etcd outage (design.md 5.8): a session that keeps progressing is not fenced
while etcd does not answer; a lease that ran out meanwhile is re-attached under a new lease
only while the committed view still lists its incarnation; a coordinator does not take a
record that vanished in the outage for a departure until its grace has passed.

A real etcd, stopped with SIGSTOP (leases expire on the server when it resumes) or
restarted on the same data (its new leader extends every lease)."""

from __future__ import annotations

import itertools
import os
import signal
import time

import pytest

from eep.membership.commit import commit_next
from eep.membership.coordinator import next_members
from eep.membership.errors import (
    EtcdUnavailable,
    Excluded,
    Fenced,
    LeaseExpiredInOutage,
    LeaseLost,
)
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.registry import SlotRecord, SlotRegistration, SlotState, read_slots
from eep.membership.session import Session, SessionConfig
from eep.membership.view import View

RIDE = SessionConfig(ttl_s=2, stall_s=1.0, ride_outages=True)


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _moving():
    counter = itertools.count()
    return lambda: next(counter)


@pytest.fixture
def client(etcd_fresh):
    c = EtcdClient(etcd_fresh.endpoint, timeout_s=0.5)
    yield c
    c.close()


def _stall(server, seconds: float) -> None:
    os.kill(server.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(server.pid, signal.SIGCONT)


def test_a_progressing_session_rides_an_outage_past_its_deadline(etcd_fresh, client):
    session = Session(client, RIDE, progress=_moving(), name="rider").open()
    try:
        deadline = session.deadline
        os.kill(etcd_fresh.pid, signal.SIGSTOP)
        try:
            _wait(lambda: time.monotonic() > deadline + 1.0, 10, "the fence deadline to pass")
            # past the deadline: not fenced, riding; writes say etcd is away
            assert not session.done.is_set(), session.loss
            assert session.riding_outage() and session.alive()
            with pytest.raises(EtcdUnavailable):
                session.check()
            time.sleep(1.5)  # past the lease's TTL on the server's clock too
        finally:
            os.kill(etcd_fresh.pid, signal.SIGCONT)
        # etcd expires the lease as it resumes: the session says so, as an outage loss
        _wait(session.done.is_set, 10, "the session to learn its lease's fate")
        assert isinstance(session.loss, LeaseExpiredInOutage), session.loss
    finally:
        session.close()


def test_a_session_that_stops_moving_in_an_outage_is_fenced(etcd_fresh, client):
    frozen = Session(client, RIDE, progress=lambda: 0, name="hung").open()
    try:
        os.kill(etcd_fresh.pid, signal.SIGSTOP)
        try:
            _wait(frozen.done.is_set, 10, "the hung owner's session to fence")
        finally:
            os.kill(etcd_fresh.pid, signal.SIGCONT)
        assert isinstance(frozen.loss, Fenced), frozen.loss
    finally:
        frozen.close()


def test_a_strict_session_still_fences_on_an_outage(etcd_fresh, client):
    strict = Session(client, SessionConfig(ttl_s=2), progress=_moving(), name="strict").open()
    try:
        os.kill(etcd_fresh.pid, signal.SIGSTOP)
        try:
            _wait(strict.done.is_set, 10, "the strict session to fence")
        finally:
            os.kill(etcd_fresh.pid, signal.SIGCONT)
        assert isinstance(strict.loss, Fenced), strict.loss
    finally:
        strict.close()


def test_a_restarted_etcd_keeps_the_lease_and_the_session_renews(etcd_fresh, client):
    session = Session(client, RIDE, progress=_moving(), name="rider").open()
    try:
        etcd_fresh.restart(down_s=3.0)  # past the deadline and the TTL
        _wait(lambda: session.outage_s() == 0.0, 15, "a renewal after the restart")
        assert not session.done.is_set(), session.loss
        assert client.lease_ttl(session.lease_id) > 0
    finally:
        session.close()


def _view(client, keys, members: dict[int, int]) -> View:
    def decide(current):
        if current is None:
            return View(1, tuple(sorted(members)), tuple(members.items()), None, "test")
        return current.next(members, None, "test")

    return commit_next(client, keys, decide, fence=[]).view


def test_a_listed_incarnation_re_attaches_after_its_lease_ran_out(etcd_fresh, client, cluster):
    keys = Keys(cluster)
    first = Session(client, RIDE, progress=_moving()).open()
    reg = SlotRegistration(client, keys, first, 0)
    record = reg.register()
    reg.update(SlotState.READY)
    _view(client, keys, {0: record.incarnation})
    _stall(etcd_fresh, 3.5)
    _wait(first.done.is_set, 10, "the lease's loss to be reported")
    assert isinstance(first.loss, LeaseExpiredInOutage)
    assert 0 not in read_slots(client, keys)[0], "the record should have gone with its lease"
    second = Session(client, RIDE, progress=_moving()).open()
    try:
        again = reg.reattach(second)
        assert again.incarnation == record.incarnation and again.lease_id == second.lease_id
        held = read_slots(client, keys)[0][0]
        assert (held.incarnation, held.lease_id, held.state) == (
            record.incarnation,
            second.lease_id,
            SlotState.READY,
        )
        reg.update(resync_epoch=1)  # it owns the slot through the new lease
    finally:
        second.close()


def test_an_excluded_incarnation_cannot_re_attach(etcd_fresh, client, cluster):
    keys = Keys(cluster)
    first = Session(client, RIDE, progress=_moving()).open()
    reg = SlotRegistration(client, keys, first, 0)
    record = reg.register()
    reg.update(SlotState.READY)
    _view(client, keys, {0: record.incarnation})
    first.close(revoke=True)  # the lease is gone ...
    _view(client, keys, {})  # ... and a view without the slot was committed meanwhile
    second = Session(client, RIDE, progress=_moving()).open()
    try:
        with pytest.raises(Excluded, match="does not list incarnation"):
            reg.reattach(second)
        assert 0 not in read_slots(client, keys)[0]
    finally:
        second.close()


def test_a_slot_taken_by_a_newer_incarnation_cannot_be_re_attached(etcd_fresh, client, cluster):
    keys = Keys(cluster)
    first = Session(client, RIDE, progress=_moving()).open()
    old = SlotRegistration(client, keys, first, 0)
    old.register()  # joining: no view lists it yet
    first.close(revoke=True)
    newer = Session(client, RIDE, progress=_moving()).open()
    SlotRegistration(client, keys, newer, 0).register()
    third = Session(client, RIDE, progress=_moving()).open()
    try:
        with pytest.raises(Excluded, match="newer incarnation"):
            old.reattach(third)
        assert read_slots(client, keys)[0][0].lease_id == newer.lease_id
    finally:
        third.close()
        newer.close()


def test_a_re_attach_never_overwrites_a_live_record(etcd_fresh, client, cluster):
    keys = Keys(cluster)
    first = Session(client, RIDE, progress=_moving()).open()
    reg = SlotRegistration(client, keys, first, 0)
    record = reg.register()
    _view(client, keys, {0: record.incarnation})
    second = Session(client, RIDE, progress=_moving()).open()
    try:
        # the first lease still holds the key: every try fails its compare, none writes
        with pytest.raises(LeaseLost):
            reg.reattach(second)
        assert read_slots(client, keys)[0][0].lease_id == first.lease_id
    finally:
        second.close()
        first.close()


def _record(slot: int, incarnation: int) -> SlotRecord:
    return SlotRecord(slot, incarnation, 1, "h", "cpu", 7, SlotState.READY)


def test_a_vanished_record_is_held_in_grace_but_a_newer_incarnation_is_not():
    view = View(4, (0, 1, 2), ((0, 1), (1, 1), (2, 1)), None, "t")
    records = {0: _record(0, 1), 2: _record(2, 2)}  # slot 1 vanished; slot 2 restarted
    members, removed, added = next_members(view, records, hold_vanished=True)
    assert (removed, added, members) == ([2], [2], {0: 1, 1: 1, 2: 2})
    members, removed, added = next_members(view, records)
    assert (removed, added, members) == ([1, 2], [2], {0: 1, 2: 2})
