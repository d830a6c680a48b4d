"""The recovery bench's timeline from event logs, views and token times (no cluster): one
failed slot and two failed slots, on synthetic inputs whose answers are known."""

from __future__ import annotations

import pytest

from eep.membership.view import View
from eep.tools.bench_recovery import _slot_list, build_timeline, rates

KILL = 100.0


def _view(epoch: int, incs: dict[int, int]) -> View:
    return View(epoch, tuple(sorted(incs)), tuple(sorted(incs.items())))


def _ev(process: str, event: str, t: float, **fields) -> dict:
    return {"process": process, "event": event, "mono": t, **fields}


def _run(slots, olds, times) -> dict:
    return {
        "kill": KILL,
        "slots": list(slots),
        "old_incarnations": list(olds),
        "num_slots": 4,
        "times": times,
        "t0": 90.0,
        "bin_s": 0.5,
        "window_s": 1.0,
        "bins": rates(times, 90.0, 115.0, 0.5),
        "pre_rate": 20.0,
    }


def _tokens(gaps: list[tuple[float, float]]) -> list[float]:
    """A token every 0.05 s from 90 to 115 s except inside ``gaps``."""
    out, t = [], 90.0
    while t < 115.0:
        if not any(a < t < b for a, b in gaps):
            out.append(round(t, 3))
        t += 0.05
    return out


def test_one_failed_slot():
    times = _tokens([(100.0, 100.3)])
    views = [
        (99.0, _view(1, {0: 1, 1: 1, 2: 1, 3: 1})),
        (100.2, _view(2, {0: 1, 1: 1, 3: 1})),
        (106.0, _view(3, {0: 1, 1: 1, 2: 2, 3: 1})),
    ]
    events = [
        _ev("supervisor2", "lease_released", 100.05, slot=2),
        _ev("worker0.1", "resumed", 100.25, slot=0),
        _ev("worker2.2", "worker_started", 104.0, slot=2),
        _ev("worker2.2", "weights_loaded", 105.0, slot=2, bytes=10, seconds=0.5),
        _ev("supervisor2", "ready", 105.8, slot=2),
    ]
    tl = build_timeline(_run([2], [1], times), events, views)
    assert (tl.detected, tl.view_committed, tl.survivors_resumed) == (0.05, 0.2, 0.25)
    assert (tl.process_up, tl.weights_loaded, tl.ready) == (4.0, 5.0, 5.8)
    assert tl.rejoined == tl.all_in_view == 6.0
    assert tl.weights["bytes"] == 10
    assert tl.outage_s == pytest.approx(0.3, abs=0.06)
    assert tl.service_back == pytest.approx(0.3, abs=0.06)


def test_two_failed_slots_first_detection_last_return():
    times = _tokens([(100.0, 100.3), (101.0, 101.2)])
    views = [
        (100.2, _view(2, {0: 1, 2: 1, 3: 1})),
        (101.2, _view(3, {0: 1, 3: 1})),
        (105.5, _view(4, {0: 1, 1: 2, 3: 1})),  # one back: not yet whole
        (107.0, _view(5, {0: 1, 1: 2, 2: 2, 3: 1})),
    ]
    events = [
        _ev("supervisor1", "lease_released", 100.05, slot=1),
        _ev("supervisor2", "lease_released", 101.04, slot=2),
        _ev("worker2.1", "resumed", 100.28, slot=2),  # a failed slot's: not a survivor's
        _ev("worker3.1", "resumed", 100.3, slot=3),
        _ev("worker1.2", "worker_started", 104.0, slot=1),
        _ev("worker2.2", "worker_started", 105.0, slot=2),
        _ev("worker1.2", "weights_loaded", 104.5, slot=1),
        _ev("worker2.2", "weights_loaded", 106.0, slot=2),
        _ev("supervisor1", "ready", 105.2, slot=1),
        _ev("supervisor2", "ready", 106.5, slot=2),
    ]
    tl = build_timeline(_run([1, 2], [1, 1], times), events, views)
    assert (tl.detected, tl.view_committed, tl.survivors_resumed) == (0.05, 0.2, 0.3)
    assert (tl.process_up, tl.weights_loaded, tl.ready) == (5.0, 6.0, 6.5)
    assert tl.rejoined == tl.all_in_view == 7.0


def test_slot_lists():
    assert _slot_list("2") == (2,) and _slot_list("1,3") == (1, 3)
    for bad in ("1,1", "a", "1,"):
        with pytest.raises(Exception, match="slot"):
            _slot_list(bad)
