"""The recovery bench's analysis and report on synthetic inputs whose answers are known (no
cluster): the phase timeline for one and two failed slots, the served curve in total and per
slot, the time back to 95% read on that curve, the worst single stream's stall against the
merged outage, latency percentiles per phase, the median/max over repeats and the table."""

from __future__ import annotations

import math

import pytest

from eep.membership.view import View
from eep.tools.bench_recovery import _slot_list
from eep.tools.faults import Fault
from eep.tools.loadgen import Load, LoadSpec, Stream
from eep.tools.recovery_report import figures, report, summary, table
from eep.tools.recovery_run import analyse
from eep.tools.recovery_settings import BenchSettings
from eep.tools.recovery_timeline import (
    Curve,
    Outage,
    build_timeline,
    counter_rates,
    dip,
    latency_phases,
    percentile,
    pre_fault_rate,
    rates,
    slot_rates,
    summarize,
    time_back,
    worst_stall,
)

KILL = 100.0


def _view(epoch: int, incs: dict[int, int]) -> View:
    return View(epoch, tuple(sorted(incs)), tuple(sorted(incs.items())))


def _ev(process: str, event: str, t: float, **fields) -> dict:
    return {"process": process, "event": event, "mono": t, **fields}


def _tokens(gaps: list[tuple[float, float]], step: float = 0.05) -> list[float]:
    """A token every ``step`` s from 90 to 115 s except inside ``gaps``."""
    out = []
    for k in range(round(25 / step)):
        t = round(90.0 + k * step, 4)
        if not any(a < t < b for a, b in gaps):
            out.append(t)
    return out


def _curve(times: list[float]) -> Curve:
    return Curve(90.0, 0.5, rates(times, 90.0, 115.0, 0.5))


def _timeline(slots, olds, times, events, views):
    outage = Outage(KILL, tuple(slots), tuple(olds), 4)
    curve = _curve(times)
    pre = pre_fault_rate(curve, 92.0, KILL)
    return build_timeline(outage, times, curve, pre, 1.0, events, views)


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
    tl = _timeline([2], [1], times, events, views)
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
    tl = _timeline([1, 2], [1, 1], times, events, views)
    assert (tl.detected, tl.view_committed, tl.survivors_resumed) == (0.05, 0.2, 0.3)
    assert (tl.process_up, tl.weights_loaded, tl.ready) == (5.0, 6.0, 6.5)
    assert tl.rejoined == tl.all_in_view == 7.0


def test_time_to_95_percent_is_read_on_the_served_curve_not_the_first_token():
    # tokens resume 0.3 s after the fault, but at half the rate until the rejoin at 106 s:
    # service is back at once, throughput only at the rejoin
    dense = _tokens([(100.0, 100.3)])
    times = [t for t in dense if not 100.3 <= t < 106.0 or round(t / 0.05) % 2 == 0]
    views = [(100.2, _view(2, {0: 1, 1: 1, 3: 1})), (106.0, _view(3, {0: 1, 1: 1, 2: 2, 3: 1}))]
    tl = _timeline([2], [1], times, [], views)
    assert tl.service_back == pytest.approx(0.3, abs=0.06)
    assert tl.throughput_95 == pytest.approx(6.0, abs=0.5)


def test_time_to_95_percent_waits_for_a_bin_that_is_back_despite_an_overshoot():
    # a backlog drained after the rejoin overshoots: a window opening in the dip would pass
    curve = Curve(0.0, 1.0, [10.0] * 5 + [6.0, 6.0] + [14.0, 14.0, 10.0, 10.0])
    assert time_back(curve, since=5.0, target=9.5, window_bins=3) == 7.0


def test_time_to_95_percent_is_none_when_the_rate_never_returns():
    curve = Curve(0.0, 1.0, [10.0] * 5 + [5.0] * 10)
    assert time_back(curve, since=5.0, target=9.5, window_bins=2) is None
    assert time_back(curve, since=0.0, target=9.5, window_bins=2) == 0.0
    # a single good bin does not make a sustained window
    curve.total[8] = 10.0
    assert time_back(curve, since=5.0, target=9.5, window_bins=2) is None


def test_rates_count_tokens_per_bin_and_drop_the_partial_last_bin():
    assert rates([0.1, 0.2, 0.6, 1.4, 2.2], 0.0, 2.5, 0.5) == [4.0, 2.0, 2.0, 0.0, 2.0]
    assert rates([0.1, 1.9], 0.0, 1.9, 1.0) == [1.0]


def test_counter_rates_interpolate_at_bin_edges():
    # 10 tokens/s, sampled off the edges; nothing sampled before 0.25 s or after 2.75 s
    samples = [(0.25, 2), (1.25, 12), (2.75, 27)]
    out = counter_rates(samples, 0.0, 0.5, 6)
    assert out[0] is None and out[-1] is None
    assert out[1:5] == pytest.approx([10.0, 10.0, 10.0, 10.0])


def test_slot_rates_show_the_failed_slot_at_zero_while_the_others_serve():
    samples = [(t, {0: 10 * t, 1: 10 * min(t, 2.0) + 10 * max(0.0, t - 4.0)}) for t in range(7)]
    per_slot = slot_rates(samples, 0.0, 1.0, 6)
    assert per_slot[0] == pytest.approx([10.0] * 6)
    assert per_slot[1] == pytest.approx([10.0, 10.0, 0.0, 0.0, 10.0, 10.0])


def _stream(seq: int, started: float, times: list[float], request_id: str = "") -> Stream:
    st = Stream(seq, 0, started, request_id=request_id or f"r{seq}")
    st.times, st.tokens = list(times), [1] * len(times)
    st.ended = times[-1] if times else None
    return st


def test_worst_stall_is_one_streams_wait_not_the_merged_outage():
    moved = _stream(0, 95.0, [95.1 + 0.1 * k for k in range(49)] + [102.0, 102.1], "moved")
    others = [_stream(k, 96.0, [96.0 + 0.1 * j for j in range(100)]) for k in (1, 2, 3)]
    merged_gap = max(b - a for st in others for a, b in zip(st.times, st.times[1:], strict=False))
    stall = worst_stall([moved, *others], KILL, {"moved"})
    assert stall["request_id"] == "moved" and stall["requeued"] is True
    assert stall["stall_s"] == pytest.approx(2.1, abs=1e-6)
    assert stall["from_s"] == pytest.approx(-0.1) and stall["to_s"] == pytest.approx(2.0)
    assert merged_gap < 0.2  # the merged token stream hides the moved stream's stall
    survivors = worst_stall(others, KILL, {"moved"})
    assert survivors["requeued"] is False and survivors["stall_s"] < 0.2


def test_worst_stall_ignores_a_wait_that_ended_before_the_fault_and_finished_streams():
    queued = _stream(0, 90.0, [99.0, 99.5, 100.5])  # 9 s queued before the fault, then 1 s
    done = _stream(1, 80.0, [90.0, 99.9])  # finished before the fault
    stall = worst_stall([queued, done], KILL, set())
    assert stall["request_id"] == "r0" and stall["stall_s"] == pytest.approx(1.0)


def test_worst_wait_until_the_rejoin_counts_streams_that_arrived_during_the_outage():
    # a full restart tears every slot down a moment after the fault: a stream that started
    # in between is not in flight at the fault, but waits for the whole restart
    short = _stream(0, 99.0, [99.1, 99.2, 100.1])
    late = _stream(1, 100.3, [110.0, 110.1])
    assert worst_stall([short, late], KILL, set())["request_id"] == "r0"
    wait = worst_stall([short, late], KILL, set(), until=110.0)
    assert wait["request_id"] == "r1" and wait["stall_s"] == pytest.approx(9.7)
    assert worst_stall([late], KILL, set(), until=100.2) is None


def test_percentile_interpolates_between_order_statistics():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile(list(range(101)), 0.99) == pytest.approx(99.0)


def test_latency_phases_group_streams_by_arrival_and_the_fault():
    before = [_stream(k, 92.0 + k, [92.1 + k, 92.2 + k, 92.3 + k]) for k in range(5)]
    warmup = _stream(9, 80.0, [85.0, 85.1])  # before the steady window: left out
    crossing = _stream(10, 99.5, [99.6, 103.0])  # in flight at the fault: felt it
    during = _stream(11, 101.0, [104.0, 104.5])
    after = _stream(12, 107.0, [107.2, 107.3, 107.4])
    lat = latency_phases([*before, warmup, crossing, during, after], KILL, 106.0, 90.0)
    assert [lat[p]["streams"] for p in ("before", "during", "after")] == [5, 2, 1]
    assert lat["before"]["ttft_p50_s"] == pytest.approx(0.1)
    assert lat["before"]["tpot_p99_s"] == pytest.approx(0.1)
    assert lat["during"]["ttft_p50_s"] == pytest.approx(1.55)  # (0.1 + 3.0) / 2
    assert lat["during"]["tpot_p99_s"] == pytest.approx(3.4 * 0.99 + 0.5 * 0.01)
    assert lat["after"]["ttft_p99_s"] == pytest.approx(0.2)


def test_dip_is_the_served_fraction_between_fault_and_rejoin():
    curve = Curve(90.0, 1.0, [100.0] * 10 + [60.0, 80.0, 70.0] + [100.0] * 5)
    # slot 2 fails; slots 0 and 1 serve 50 each before and 30/40/35 each during the outage
    curve.per_slot = {
        0: [50.0] * 10 + [30.0, 40.0, 35.0] + [25.0] * 5,
        1: [50.0] * 9 + [None, 30.0, 40.0, 35.0] + [25.0] * 5,  # a missed poll is left out
        2: [0.0] * 18,
    }
    out = dip(curve, (90.0, KILL), Outage(KILL, (2,), (1,), 3), 103.0)
    assert out == {
        "outage_mean_frac": 0.7,
        "outage_min_frac": 0.6,
        "outage_bins": 3,
        "survivors_frac": 0.7,
    }
    idle = Curve(90.0, 1.0, [0.0] * 18)
    assert dip(idle, (90.0, KILL), Outage(KILL, (2,), (1,), 3), 103.0)["outage_mean_frac"] is None


def test_summarize_gives_median_and_max_over_runs_that_have_the_figure():
    assert summarize([3.0, 1.0, None, 2.0, 10.0]) == {"median": 2.5, "max": 10.0, "n": 4}
    assert summarize([None]) == {"median": None, "max": None, "n": 0}


def _recorded_run(rejoin_s: float, stall_s: float) -> dict:
    """A run's record built the way the bench builds it, from a load's recorded streams: nine
    streams before the fault, one crossing it that stalls ``stall_s``, one after the rejoin."""
    load = Load("http://unused", [[1]], LoadSpec(max_tokens=4, rate=10.0))
    load.started = 90.0
    load.streams = [_stream(k, 90.0 + k, [90.1 + k + 0.1 * j for j in range(4)]) for k in range(9)]
    load.streams.append(_stream(20, 99.8, [99.9, 99.9 + stall_s, 100.0 + stall_s]))
    back = 100.0 + rejoin_s
    load.streams.append(_stream(21, back, [back + 0.1 * j for j in range(1, 5)]))
    views = [(100.2, _view(2, {0: 1, 1: 1, 3: 1})), (back, _view(3, {0: 1, 1: 1, 2: 2, 3: 1}))]
    fault = Fault(2, "worker", "SIGKILL", 1, KILL, 1, 1, 1, 0, 0, 1, tokens_during=3)
    rec = analyse(_settings(), load, [], 92.0, 110.0, [fault], [], views)
    return rec | {
        "capacity": {"tokens_per_s": 50.0},
        "load": {"spec": {"rate": 10.0, "max_tokens": 4}, "described": "open"},
        "faults": [fault.to_dict()],
        "invariants": {"requests": 11, "requests_lost": 0, "outputs_differing": 0},
        "stall": worst_stall(load.streams, KILL, set()),
        "survivor_stall": None,
        "outage_wait": worst_stall(load.streams, KILL, set(), until=back),
    }


def _settings(**over) -> BenchSettings:
    base = dict(
        model_path="m",
        dtype="float64",
        device="cpu",
        num_slots=4,
        max_num_seqs=4,
        max_tokens=4,
        ttl_s=3,
        exchange_timeout_s=2.0,
        cuda_graphs=False,
        standby_stage=True,
        fault="kill",
        failed_slots=(2,),
        stagger_s=0.0,
        load="open",
        streams=16,
        load_factor=0.9,
        rate=None,
        capacity_streams=32,
        capacity_s=6.0,
        capacity_warmup_s=3.0,
        warmup_s=5.0,
        at_s=10.0,
        duration_s=90.0,
        tail_s=10.0,
        bin_s=0.5,
        window_s=1.0,
    )
    return BenchSettings(**(base | over))


def test_repeated_runs_give_median_and_max_and_the_ratio_of_medians():
    runs = {
        "elastic": [_recorded_run(6, 0.3), _recorded_run(8, 0.5), _recorded_run(7, 0.4)],
        "baseline": [_recorded_run(9, 8.0), _recorded_run(10, 9.0)],
    }
    assert figures(runs["elastic"][1])["worst_stream_stall_s"] == pytest.approx(0.5)
    summ = summary(runs)
    assert summ["elastic"]["worst_stream_stall_s"] == {"median": 0.4, "max": 0.5, "n": 3}
    assert summ["elastic"]["all_in_view"]["median"] == pytest.approx(7.0)
    assert summ["baseline"]["all_in_view"] == {"median": 9.5, "max": 10.0, "n": 2}
    rep = report({"commit": "c"}, {}, {"num_slots": 4}, runs, [])
    assert rep["ratios"]["worst stream stall"]["ratio"] == pytest.approx(0.4 / 8.5, abs=1e-4)
    text = table(rep)
    assert "elastic (3 runs)" in text and "baseline (2 runs)" in text
    assert "worst stream stall   0.400 s vs 8.500 s" in text
    assert not math.isnan(summ["elastic"]["outage_mean_frac"]["median"])


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"load_factor": 1.2}, "load-factor"),
        ({"load_factor": 0.0}, "load-factor"),
        ({"failed_slots": (0, 1, 2, 3)}, "fewer than all"),
        ({"failed_slots": (4,)}, "--slot 4"),
        ({"num_slots": 1, "failed_slots": (0,)}, "--slots 1"),
        ({"window_s": 0.2}, "--window"),
        ({"max_num_seqs": 0}, "--max-num-seqs"),
        ({"tail_s": -1.0}, "--tail"),
    ],
)
def test_bad_settings_are_refused_with_the_option_named(over, match):
    with pytest.raises(ValueError, match=match):
        _settings(**over)


def test_survivors_share_decides_whether_a_load_factor_shows_the_outage():
    assert _settings().survivors_frac == 0.75
    assert _settings(failed_slots=(1, 2)).survivors_frac == 0.5


def test_slot_lists():
    assert _slot_list("2") == (2,) and _slot_list("1,3") == (1, 3)
    for bad in ("1,1", "a", "1,"):
        with pytest.raises(Exception, match="slot"):
            _slot_list(bad)
