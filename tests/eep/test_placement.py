"""Expert placement: known answers, then seeded random loops checking the invariants."""

from __future__ import annotations

import json
import random

import pytest

from eep.placement import (
    Placement,
    PlacementError,
    add_slot,
    initial_placement,
    repair,
)


def _orphaned_by(p: Placement, slot: int) -> tuple[int, ...]:
    """The experts that would be orphaned if ``slot`` died now."""
    count = p.replica_count
    return tuple(sorted(e for e in p.slot_experts(slot) if e >= 0 and count[e] == 1))


# --- known answers ---------------------------------------------------------------------------


def test_double_capacity_gives_every_expert_two_replicas_on_distinct_slots():
    p = initial_placement(num_experts=4, num_slots=4, experts_per_slot=2)
    assert p.phy2log == (0, 2, 0, 2, 1, 3, 1, 3)
    assert p.replica_count == [2, 2, 2, 2]
    assert p.log2phy == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert all(_orphaned_by(p, s) == () for s in p.slots)


def test_spare_replicas_go_to_the_most_loaded_experts():
    p = initial_placement(4, 3, 2, load=[1.0, 10.0, 2.0, 1.0])  # 2 spare replicas
    assert p.replica_count == [1, 2, 2, 1]
    p = initial_placement(4, 4, 3, load=[1.0, 10.0, 2.0, 1.0])  # 8 spare, at most 4 a expert
    assert p.replica_count == [2, 4, 4, 2]  # per-replica loads 0.5, 2.5, 0.5, 0.5
    assert p.max_replicas == 4


def test_without_double_capacity_singletons_are_spread_over_slots():
    p = initial_placement(8, 4, 3)  # 4 singletons: one orphan at most per failure
    assert p.phy2log == (0, 2, 4, 0, 2, 5, 1, 3, 6, 1, 3, 7)
    assert [_orphaned_by(p, s) for s in p.slots] == [(4,), (5,), (6,), (7,)]


def test_repair_rehomes_an_orphan_over_a_redundant_replica():
    p = initial_placement(8, 4, 3)
    plan = repair(p, live_slots=[0, 1, 3])
    assert plan.placement.phy2log == (6, 2, 4, 0, 2, 5, -1, -1, -1, 1, 3, 7)
    assert plan.orphaned == ()
    assert plan.placement.live == (0, 1, 3)


def test_repair_without_capacity_reports_the_degraded_experts():
    p = initial_placement(6, 3, 2)  # exactly one replica each
    plan = repair(p, [0])
    assert plan.placement.phy2log == (0, 3, -1, -1, -1, -1)
    assert plan.orphaned == (1, 2, 4, 5)


def test_a_returning_slot_gets_its_home_experts_back():
    p = initial_placement(8, 4, 3)
    down = repair(p, [0, 1, 3]).placement
    plan = add_slot(down, 2)
    # slot 0 gives expert 0 back its home position (expert 6 re-homed there is dropped)
    assert plan.placement == p
    assert plan.orphaned == ()


def test_json_round_trip_and_bad_payloads():
    p = repair(initial_placement(8, 4, 3, load=range(8)), [1, 2, 3]).placement
    assert Placement.from_json(p.to_json()) == p
    assert Placement.from_json(json.dumps(p.to_json())) == p
    bad = p.to_json() | {"phy2log": [0] * 12}
    with pytest.raises(PlacementError, match="twice on slot"):
        Placement.from_json(bad)
    with pytest.raises(PlacementError, match="not a placement payload"):
        Placement.from_json({"num_experts": 8})
    with pytest.raises(PlacementError, match="not live"):
        Placement.from_json(p.to_json() | {"phy2log": [1] + [-1] * 11})


def test_impossible_requests_are_refused():
    with pytest.raises(PlacementError, match="do not fit"):
        initial_placement(9, 2, 4)
    p = initial_placement(4, 4, 2)
    with pytest.raises(PlacementError, match="use|add_slot"):
        repair(repair(p, [0, 1]).placement, [0, 1, 2])
    with pytest.raises(PlacementError, match="already live"):
        add_slot(p, 1)


# --- properties over random configurations ---------------------------------------------------


def _random_configs(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        num_slots = rng.randint(1, 12)
        per_slot = rng.randint(1, 10)
        num_experts = rng.randint(1, num_slots * per_slot)
        load = [rng.expovariate(1.0) for _ in range(num_experts)] if rng.random() < 0.5 else None
        yield rng, initial_placement(num_experts, num_slots, per_slot, load=load)


def _check_valid(p: Placement) -> None:
    """No expert twice on a slot; log2phy and replica_count agree with phy2log."""
    for s in p.slots:
        held = [e for e in p.slot_experts(s) if e >= 0]
        assert len(held) == len(set(held))
    for e, row in enumerate(p.log2phy):
        live = [q for q in row if q >= 0]
        assert len(live) == p.replica_count[e] <= p.max_replicas
        assert all(p.phy2log[q] == e and p.slot_of(q) in p.live for q in live)


def test_initial_placement_covers_every_expert_and_tolerates_one_failure_when_it_can():
    for _, p in _random_configs(300, seed=1):
        _check_valid(p)
        assert min(p.replica_count) >= 1
        e, cap = p.num_experts, p.capacity
        worst = max(len(_orphaned_by(p, s)) for s in p.slots)
        if cap >= 2 * e and p.num_slots >= 2:
            assert worst == 0
        else:  # the unavoidable singletons, spread evenly
            singletons = sum(c == 1 for c in p.replica_count)
            assert singletons == (e if p.num_slots == 1 else max(0, 2 * e - cap))
            assert worst <= -(-singletons // p.num_slots)


def test_repair_after_any_single_failure_covers_every_expert_when_capacity_allows():
    for _, p in _random_configs(200, seed=2):
        for dead in p.slots:
            live = [s for s in p.slots if s != dead]
            plan = repair(p, live)
            _check_valid(plan.placement)
            if (p.num_slots - 1) * p.experts_per_slot >= p.num_experts:
                assert plan.orphaned == ()
            _check_survivors_keep_what_they_hold(p, plan)


def _check_survivors_keep_what_they_hold(before: Placement, plan) -> None:
    """A survivor's position changes only to re-home an orphan over a redundant replica."""
    after = plan.placement
    orphaned_by_failure = {
        e
        for e in range(before.num_experts)
        if not any(before.slot_of(q) in after.live for q in before.log2phy[e] if q >= 0)
    }
    for p, (old, new) in enumerate(zip(before.phy2log, after.phy2log, strict=True)):
        if before.slot_of(p) in after.live and old != new:
            assert new in orphaned_by_failure
            assert old < 0 or after.replica_count[old] >= 1


def test_repeated_failures_and_returns_keep_invariants_and_end_at_home():
    for rng, p in _random_configs(150, seed=3):
        current = p
        for _ in range(6):
            dead = [s for s in p.slots if s not in current.live]
            if dead and (rng.random() < 0.5 or len(current.live) == 1):
                plan = add_slot(current, rng.choice(dead))
            else:
                survivors = [s for s in current.live if rng.random() < 0.8]
                plan = repair(current, survivors)
            _check_valid(plan.placement)
            current = plan.placement
        for s in p.slots:
            if s not in current.live:
                current = add_slot(current, s).placement
        assert current == p


def test_planning_is_deterministic():
    for _, p in _random_configs(50, seed=4):
        again = initial_placement(p.num_experts, p.num_slots, p.experts_per_slot, load=p.load)
        assert again == p
        live = list(p.slots)[::2]
        assert repair(p, live) == repair(p, live)
