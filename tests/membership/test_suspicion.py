"""Data-plane suspicion, without etcd: the exclusion vote, the rounds (a plain resync first, an
exclusion when members ask again in the view that resync produced) and the quarantine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep.membership.coordinator import CoordinatorConfig
from eep.membership.registry import SlotRecord, SlotState
from eep.membership.suspicion import (
    Action,
    Quarantine,
    SuspicionRounds,
    exclude_by_vote,
    resync_requests,
)
from eep.membership.view import View


def _view(epoch: int, members, incarnation: int = 1) -> View:
    return View(epoch, tuple(members), tuple((s, incarnation) for s in members))


def _rec(slot: int, resync_epoch: int = 0, suspects=(), incarnation: int = 1) -> SlotRecord:
    return SlotRecord(
        slot,
        incarnation,
        100 + slot,
        "h",
        "cpu",
        7,
        SlotState.READY,
        resync_epoch=resync_epoch,
        suspects=tuple(suspects),
    )


def _asking(epoch: int, reports: dict[int, set[int]], members) -> dict[int, SlotRecord]:
    """Records of ``members``; those in ``reports`` ask for a view newer than ``epoch``."""
    return {s: _rec(s, epoch, sorted(reports[s])) if s in reports else _rec(s) for s in members}


# --- the vote ---------------------------------------------------------------------------------


def test_one_host_cut_off_is_excluded():
    # members 0-5; slots 4 and 5 (one host) cut off from the rest
    reports = {s: {4, 5} for s in range(4)} | {4: {0, 1, 2, 3}, 5: {0, 1, 2, 3}}
    assert sorted(exclude_by_vote(range(6), reports)) == [4, 5]


def test_two_equal_hosts_cut_from_each_other_keep_the_side_of_the_lowest_slot():
    reports = {0: {2, 3}, 1: {2, 3}, 2: {0, 1}, 3: {0, 1}}
    assert sorted(exclude_by_vote(range(4), reports)) == [2, 3]


def test_a_perfect_tie_across_interleaved_slots_keeps_the_side_of_the_lowest_slot():
    # {0, 3} against {1, 2}: the higher slot number alone would exclude 3 and then 0
    reports = {0: {1, 2}, 3: {1, 2}, 1: {0, 3}, 2: {0, 3}}
    assert sorted(exclude_by_vote(range(4), reports)) == [1, 2]


def test_a_silent_side_is_not_voted_out_by_a_lone_reporter():
    # only the cut-off slot had work, so only it timed out: it goes, not the five it suspects
    assert exclude_by_vote(range(6), {5: {0, 1, 2, 3, 4}}) == [5]
    # only the majority had work: the two it suspects go
    assert sorted(exclude_by_vote(range(6), {s: {4, 5} for s in range(4)})) == [4, 5]


def test_a_slot_every_member_suspects_goes_alone():
    # a one-way fault: 3's sends are lost, it hears everyone
    assert exclude_by_vote(range(5), {0: {3}, 1: {3}, 2: {3}, 4: {3}}) == [3]


def test_the_lowest_slot_goes_only_with_strictly_the_most_votes():
    assert exclude_by_vote(range(4), {1: {0}, 2: {0}, 3: {0}}) == [0]
    assert exclude_by_vote(range(2), {0: {1}, 1: {0}}) == [1]


def test_self_suspicion_and_non_members_count_for_nothing():
    assert exclude_by_vote([0, 1, 2], {0: {0, 7}, 9: {1, 2}}) == []


@settings(max_examples=300, deadline=None)
@given(
    st.sets(st.integers(0, 11), min_size=1),
    st.dictionaries(st.integers(0, 13), st.sets(st.integers(0, 13)), max_size=12),
)
def test_the_vote_leaves_a_member_and_no_conflict_among_the_rest(members, reports):
    excluded = exclude_by_vote(members, reports)
    assert len(set(excluded)) == len(excluded) and set(excluded) <= members
    remaining = members - set(excluded)
    assert remaining
    for reporter, suspects in reports.items():
        if reporter in remaining:
            assert not (suspects & remaining) - {reporter}
    assert exclude_by_vote(members, reports) == excluded  # deterministic


# --- the rounds -------------------------------------------------------------------------------

MEMBERS = range(6)
CUT = {s: {4, 5} for s in range(4)} | {4: {0, 1, 2, 3}, 5: {0, 1, 2, 3}}


def test_resync_requests_are_the_current_members_asking_for_this_epoch_or_later():
    view = _view(5, [0, 1, 2])
    records = {0: _rec(0, 4), 1: _rec(1, 5), 2: _rec(2, 6, incarnation=2), 3: _rec(3, 9)}
    assert resync_requests(view, records) == [1]
    assert resync_requests(None, records) == []


def test_the_first_round_resyncs_and_the_second_excludes_by_vote():
    rounds = SuspicionRounds(collect_s=1.0)
    view = _view(7, MEMBERS)
    first = rounds.decide(view, _asking(7, CUT, MEMBERS), now=100.0)
    assert first.action is Action.RESYNC and first.asked == tuple(MEMBERS)
    assert first.reports[0] == (4, 5) and "resync asked by" in first.reason
    resynced = view.next(dict(view.incarnations), None, first.reason)
    assert rounds.committed(view, resynced, first, now=100.0) == {}
    # stale requests (for epoch 7) ask nothing of epoch 8
    assert rounds.decide(resynced, _asking(7, CUT, MEMBERS), now=101.0).action is Action.NONE
    second = rounds.decide(resynced, _asking(8, CUT, MEMBERS), now=108.0)
    assert second.action is Action.EXCLUDE and sorted(second.exclude) == [4, 5]
    assert second.reason.startswith("excluded by suspicion: [4, 5]")
    members = {s: i for s, i in resynced.incarnations if s not in second.exclude}
    after = resynced.next(members, None, second.reason)
    assert rounds.committed(resynced, after, second, now=108.0) == {4: 10.0, 5: 10.0}
    # the next failure in the exclusion's view starts over with a plain resync
    again = rounds.decide(after, _asking(9, {0: {3}, 3: {0}}, range(4)), now=120.0)
    assert again.action is Action.RESYNC


def test_a_membership_change_between_the_rounds_starts_them_over():
    rounds = SuspicionRounds()
    view = _view(3, MEMBERS)
    first = rounds.decide(view, _asking(3, CUT, MEMBERS), now=0.0)
    resynced = view.next(dict(view.incarnations), None, "resync")
    rounds.committed(view, resynced, first, now=0.0)
    joined = resynced.next({**dict(resynced.incarnations), 6: 1}, None, "added [6]")
    rounds.committed(resynced, joined, None, now=1.0)
    assert rounds.decide(joined, _asking(5, CUT, MEMBERS), now=9.0).action is Action.RESYNC


def test_requests_without_suspects_are_always_a_plain_resync():
    rounds = SuspicionRounds()
    view = _view(3, [0, 1])
    for epoch in (3, 4, 5):
        decision = rounds.decide(view, _asking(epoch, {0: set(), 1: set()}, [0, 1]), now=0.0)
        assert decision.action is Action.RESYNC and not decision.reports
        after = view.next(dict(view.incarnations), None, decision.reason)
        assert rounds.committed(view, after, decision, now=0.0) == {}
        view = after


def test_a_repeat_round_waits_for_every_member_or_the_collection_window():
    rounds = SuspicionRounds(collect_s=1.0)
    view = _view(2, MEMBERS)
    first = rounds.decide(view, _asking(2, CUT, MEMBERS), now=0.0)
    resynced = view.next(dict(view.incarnations), None, "resync")
    rounds.committed(view, resynced, first, now=0.0)
    early = {s: CUT[s] for s in (0, 1)}
    assert rounds.decide(resynced, _asking(3, early, MEMBERS), now=10.0).action is Action.WAIT
    assert rounds.decide(resynced, _asking(3, early, MEMBERS), now=10.5).action is Action.WAIT
    late = rounds.decide(resynced, _asking(3, early, MEMBERS), now=11.0)
    assert late.action is Action.EXCLUDE and sorted(late.exclude) == [4, 5]
    # a member without a live record of its incarnation is not waited for
    records = _asking(3, {s: CUT[s] for s in (0, 1, 2, 3)}, range(4))
    records[4] = _rec(4, incarnation=2)
    assert rounds.decide(resynced, records, now=10.1).action is Action.EXCLUDE


# --- the quarantine ---------------------------------------------------------------------------


def test_the_quarantine_doubles_up_to_its_cap_and_holds_the_excluded_incarnation():
    q = Quarantine(base_s=10.0, max_s=60.0, reset_s=60.0)
    assert [q.exclude(4, inc, now=0.0) for inc in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    assert q.strikes(4) == 5
    q = Quarantine(base_s=10.0, max_s=60.0, reset_s=60.0)
    q.exclude(4, 3, now=100.0)
    assert q.holds(4, 4, now=109.9) and not q.holds(4, 4, now=110.0)
    assert q.holds(4, 3, now=1000.0) and q.holds(4, 2, now=1000.0)  # never the excluded one
    assert not q.holds(5, 1, now=100.0)
    assert q.exclude(4, 4, now=120.0) == 20.0


def test_the_count_is_forgotten_after_staying_in_the_views_for_reset_s():
    q = Quarantine(base_s=10.0, max_s=60.0, reset_s=60.0)
    q.exclude(4, 1, now=0.0)
    q.observe([0, 4], now=10.0)
    q.observe([0, 4], now=50.0)
    q.observe([0], now=60.0)  # out again: the 60 s start over
    q.observe([0, 4], now=61.0)
    q.observe([0, 4], now=120.0)
    assert q.strikes(4) == 1
    q.observe([0, 4], now=121.0)
    assert q.strikes(4) == 0 and not q.holds(4, 1, now=121.0)
    assert q.exclude(4, 2, now=130.0) == 10.0


def test_the_coordinator_config_checks_the_suspicion_settings():
    CoordinatorConfig(suspect_quarantine_s=0.0)
    with pytest.raises(ValueError, match="suspect quarantine"):
        CoordinatorConfig(suspect_quarantine_s=90.0)
    with pytest.raises(ValueError, match="suspect_collect_s"):
        CoordinatorConfig(suspect_collect_s=-1.0)


def test_a_host_cut_from_its_peers_is_excluded_whichever_side_reported():
    from eep.membership.suspicion import exclude_hosts

    host_of = {0: "a", 2: "a", 1: "b", 3: "b"}
    # only a rank of the host that stays reported: the other host goes, not the reporter
    assert exclude_hosts([0, 1, 2, 3], {2: [1, 3]}, host_of) == [1, 3]
    # only the cut host's ranks reported: still the same host (the lowest slot's host stays)
    assert exclude_hosts([0, 1, 2, 3], {1: [0, 2], 3: [0]}, host_of) == [1, 3]
    # three hosts, the third cut from both others: it goes, even with fewer reports about it
    host_of = {0: "a", 1: "b", 2: "c", 3: "a", 4: "b", 5: "c"}
    assert exclude_hosts(range(6), {0: [2], 4: [5], 2: [0, 1, 3, 4]}, host_of) == [2, 5]
    # a conflict inside one host is no partition between hosts: decided slot by slot
    assert exclude_hosts([0, 1, 2, 3], {0: [3]}, {0: "a", 3: "a", 1: "b", 2: "b"}) is None
