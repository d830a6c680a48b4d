"""Where the front-end runs requests: the pure decisions of eep.frontend.assign."""

from __future__ import annotations

from eep.frontend.assign import blocks_for, least_loaded, pick_slot, rebalance_moves, stranded
from eep.frontend.request_log import Record, RequestState
from eep.membership.view import View
from eep.protocol import SamplingParams


def _rec(i: int, slot: int | None, incarnation: int = 1, state=RequestState.RUNNING) -> Record:
    return Record(f"r{i}", [1], SamplingParams(), slot=slot, incarnation=incarnation, state=state)


def _view(epoch: int, incarnations: dict[int, int]) -> View:
    return View(epoch, tuple(sorted(incarnations)), tuple(incarnations.items()))


def test_least_loaded_takes_the_emptiest_then_lowest_slot():
    recs = [_rec(0, 0), _rec(1, 0), _rec(2, 1)]
    assert least_loaded([0, 1, 2], recs) == 2
    assert least_loaded([0, 1], recs) == 1
    assert least_loaded([1, 0], [_rec(0, 0), _rec(1, 1)]) == 0
    assert least_loaded([], recs) is None


def test_queued_requests_count_nowhere():
    recs = [_rec(0, None, state=RequestState.QUEUED)] * 3 + [_rec(1, 1)]
    assert least_loaded([0, 1], recs) == 0


def test_rebalance_fills_a_joined_slot_to_its_fair_share_from_the_most_loaded():
    recs = [_rec(i, 0) for i in range(5)] + [_rec(10 + i, 1) for i in range(3)]
    moves = rebalance_moves(2, [0, 1, 2], recs)
    # 8 running over 3 slots: the fair share is 2; both come off slot 0 (5 > 3), newest first
    assert [(r.request_id, s) for r, s in moves] == [("r4", 0), ("r3", 0)]


def test_rebalance_leaves_migrating_requests_and_dead_targets():
    recs = [_rec(i, 0) for i in range(4)]
    for r in recs:
        r.migrating = True
    assert rebalance_moves(1, [0, 1], recs) == []
    assert rebalance_moves(3, [0, 1], [_rec(i, 0) for i in range(4)]) == []


def test_rebalance_never_moves_below_the_fair_share():
    recs = [_rec(0, 0), _rec(1, 0), _rec(2, 1)]
    moves = rebalance_moves(2, [0, 1, 2], recs)
    assert [(r.request_id, s) for r, s in moves] == [("r1", 0)]


def test_a_view_strands_requests_of_slots_it_dropped_or_replaced():
    recs = [_rec(0, 0, 1), _rec(1, 1, 1), _rec(2, 2, 1), _rec(3, None, state=RequestState.QUEUED)]
    view = _view(5, {0: 1, 1: 2})  # slot 1 restarted (incarnation 2), slot 2 gone
    assert [r.request_id for r in stranded(view, recs)] == ["r1", "r2"]
    assert stranded(_view(6, {0: 1, 1: 1, 2: 1}), recs) == []


def _sized(i: int, slot: int | None, prompt: int, max_tokens: int) -> Record:
    return Record(
        f"s{i}",
        [1] * prompt,
        SamplingParams(max_tokens=max_tokens),
        slot=slot,
        state=RequestState.RUNNING if slot is not None else RequestState.QUEUED,
    )


def test_pick_slot_takes_the_least_loaded_slot_with_room_for_the_whole_context():
    # 4 blocks of 16 tokens per slot: slot 0 runs one request of 3 blocks (40 tokens), slot 1
    # two of one block each; a queued request reserves nothing
    recs = [_sized(0, 0, 8, 32), _sized(1, 1, 2, 8), _sized(2, 1, 2, 8), _sized(3, None, 9, 500)]
    assert pick_slot([0, 1], recs, need=16, capacity=4, block_size=16) == 0  # fewer requests
    assert pick_slot([0, 1], recs, need=17, capacity=4, block_size=16) == 1  # 2 blocks
    assert pick_slot([0, 1], recs, need=33, capacity=4, block_size=16) is None  # 3 blocks
    assert pick_slot([0, 1], recs, need=16, capacity=4, block_size=16, exclude=[0]) == 1
    assert pick_slot([], recs, need=1, capacity=4, block_size=16) is None
    assert blocks_for(16, 16) == 1 and blocks_for(17, 16) == 2
