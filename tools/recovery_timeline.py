"""The recovery bench's analysis: pure functions of what one run recorded (no cluster, no I/O).

Inputs, all on the host's monotonic clock: every token's arrival at a client (the served
curve), the streams as the load generator saw them, the front-end's per-slot token counters
polled once per bin, the processes' events (``eep.events``) and the committed views. Outputs:
tokens/s per bin (in total and per slot), the phase timeline after the fault, the stalls
(the worst single stream's, and the outage of all streams merged), and TTFT/TPOT percentiles
before, during and after the outage.

Glossary: the *fault* is the first fault of the run (``--slot 1,2`` fails several slots,
``--stagger`` apart); the *rejoin* is the first view holding every failed slot with a new
incarnation; a stream *crosses* the fault when it started before the fault and ended after it.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outage:
    """The fault as the analysis needs it."""

    fault_at: float  # monotonic s of the first fault
    slots: tuple[int, ...]  # the failed slots
    old_incarnations: tuple[int, ...]  # theirs before the fault
    num_slots: int


@dataclass
class Curve:
    """Tokens/s served in consecutive bins of ``bin_s`` from ``t0``: ``total`` from the clients'
    token times, ``per_slot`` from the front-end's per-slot counters (``None``: not sampled)."""

    t0: float
    bin_s: float
    total: list[float]
    per_slot: dict[int, list[float | None]] = field(default_factory=dict)

    def start(self, i: int) -> float:
        return self.t0 + i * self.bin_s

    def index(self, t: float) -> int:
        return math.floor((t - self.t0) / self.bin_s)


def rates(times: list[float], t0: float, t1: float, bin_s: float) -> list[float]:
    """Tokens/s in consecutive bins of ``bin_s`` from ``t0`` up to ``t1`` (a partial last bin is
    dropped: it would read low)."""
    counts = [0] * max(0, int((t1 - t0) / bin_s))
    for t in times:
        i = math.floor((t - t0) / bin_s)
        if 0 <= i < len(counts):
            counts[i] += 1
    return [c / bin_s for c in counts]


def counter_rates(
    samples: list[tuple[float, int]], t0: float, bin_s: float, num_bins: int
) -> list[float | None]:
    """Per-bin rate of a monotone counter sampled at irregular times ``(mono, value)``: the
    counter is interpolated linearly at the bin edges (the poller wakes once per bin, never
    exactly on an edge); bins not covered by samples on both sides are ``None``."""

    def at(t: float) -> float | None:
        for (ta, va), (tb, vb) in itertools.pairwise(samples):
            if ta <= t <= tb:
                return va if tb == ta else va + (vb - va) * (t - ta) / (tb - ta)
        return None

    edges = [at(t0 + i * bin_s) for i in range(num_bins + 1)]
    return [
        None if a is None or b is None else (b - a) / bin_s for a, b in itertools.pairwise(edges)
    ]


def slot_rates(
    samples: list[tuple[float, dict[int, int]]], t0: float, bin_s: float, num_bins: int
) -> dict[int, list[float | None]]:
    """:func:`counter_rates` of every slot's ``tokens`` counter (``/debug/slots``)."""
    slots = sorted({s for _, counts in samples for s in counts})
    return {
        s: counter_rates([(t, c.get(s, 0)) for t, c in samples], t0, bin_s, num_bins) for s in slots
    }


def pre_fault_rate(curve: Curve, steady: float, fault_at: float) -> float:
    """Median tokens/s of the bins wholly inside ``[steady, fault_at)``."""
    pre = [curve.total[i] for i in _bins_within(curve, steady, fault_at)]
    return statistics.median(pre) if pre else 0.0


def time_back(curve: Curve, since: float, target: float, window_bins: int) -> float | None:
    """Start of the first bin, from the bin holding ``since`` on, that is at or above
    ``target`` and from which the mean over ``window_bins`` bins stays there (clipped to
    ``since``); ``None`` if none is. The first bin must itself be back: a window that opens in
    the dip would otherwise pass on the overshoot of a backlog drained after the rejoin."""
    bins = curve.total
    for i in range(max(0, curve.index(since)), len(bins) - window_bins + 1):
        if bins[i] >= target and statistics.fmean(bins[i : i + window_bins]) >= target:
            return max(curve.start(i), since)
    return None


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float] | None:
    """The longest gap between consecutive tokens of all streams merged that ends after
    ``start`` and begins before ``end``: ``(begin, end)``."""
    gaps = [(b - a, a, b) for a, b in itertools.pairwise(times) if b > start and a < end]
    return max(gaps)[1:] if gaps else None


def stream_stall(started: float, times: list[float], since: float) -> tuple[float, float] | None:
    """One stream's longest wait that ends after ``since``: from its start to its first token,
    or between two of its tokens, ``(begin, end)``. A wait that ended before the fault (queueing
    at a full rank) is not the fault's, so it does not count."""
    marks = [started, *times]
    gaps = [(b - a, a, b) for a, b in itertools.pairwise(marks) if b > since]
    return max(gaps)[1:] if gaps else None


def crossing(streams: list, fault_at: float, until: float | None = None) -> list:
    """The streams in flight at the fault (started before it, ended after it or never); with
    ``until``, every stream in flight at some time in ``[fault_at, until)``."""
    start_by = fault_at if until is None else until
    return [s for s in streams if s.started < start_by and (s.ended is None or s.ended > fault_at)]


def worst_stall(streams: list, fault_at: float, moved: set[str], until: float | None = None):
    """The single stream that waited longest after the fault, not merged with any other: its
    wait (s), where the wait lay relative to the fault, and whether it was re-queued. Among the
    streams in flight at the fault, or (``until``) at any time up to ``until``: those count the
    arrivals' queueing while capacity is short, and the streams a full restart tears down a
    moment after the fault. ``None`` if no stream qualifies."""
    worst = None
    for st in crossing(streams, fault_at, until):
        gap = stream_stall(st.started, st.times, fault_at)
        if gap and (worst is None or gap[1] - gap[0] > worst[0]):
            worst = (gap[1] - gap[0], gap, st)
    if worst is None:
        return None
    length, (a, b), st = worst
    return {
        "stall_s": round(length, 4),
        "from_s": round(a - fault_at, 4),
        "to_s": round(b - fault_at, 4),
        "request_id": st.request_id,
        "requeued": st.request_id in moved,
    }


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation between order statistics."""
    xs = sorted(values)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_phases(streams: list, fault_at: float, rejoin_at: float | None, steady: float) -> dict:
    """TTFT and TPOT p50/p99 of the streams ``before`` the fault (arrived after ``steady``,
    done before the fault), ``during`` (arrived between the fault and the rejoin, or in flight
    at the fault: they felt it) and ``after`` (arrived at or after the rejoin)."""
    end = math.inf if rejoin_at is None else rejoin_at
    groups: dict[str, list] = {"before": [], "during": [], "after": []}
    for st in streams:
        if st.started < steady or not st.times:
            continue
        if st.ended is not None and st.ended <= fault_at:
            groups["before"].append(st)
        elif st.started < end:
            groups["during"].append(st)
        else:
            groups["after"].append(st)
    out = {}
    for name, group in groups.items():
        ttft = [s.ttft_s for s in group if s.ttft_s is not None]
        tpot = [s.tpot_s for s in group if s.tpot_s is not None]
        out[name] = {
            "streams": len(group),
            **{f"ttft_p{q}_s": _round(percentile(ttft, q / 100)) for q in (50, 99)},
            **{f"tpot_p{q}_s": _round(percentile(tpot, q / 100)) for q in (50, 99)},
        }
    return out


def first_event(events: list[dict], name: str, after: float, process: str, **match) -> dict | None:
    for ev in events:
        if (
            ev["event"] == name
            and ev["mono"] >= after
            and re.fullmatch(process, ev["process"])
            and all(ev.get(k) == v for k, v in match.items())
        ):
            return ev
    return None


@dataclass
class Timeline:
    """Seconds after the fault (``None``: not seen)."""

    detected: float | None = None
    view_committed: float | None = None
    survivors_resumed: float | None = None
    first_token: float | None = None
    process_up: float | None = None
    weights_loaded: float | None = None
    ready: float | None = None
    rejoined: float | None = None
    all_in_view: float | None = None
    service_back: float | None = None  # end of the merged outage
    throughput_95: float | None = None
    outage_s: float | None = None  # the longest gap of all streams merged, before the rejoin
    reintegration_gap_s: float | None = None  # the same around the rejoin
    weights: dict | None = None


def view_marks(outage: Outage, views: list[tuple[float, object]]) -> dict[str, float | None]:
    """Monotonic times of the first view without a failed slot (``removed``), the first with
    every failed slot back as a new incarnation (``back``) and the first that is also whole."""
    after = [(t, v) for t, v in views if t >= outage.fault_at]
    pairs = list(zip(outage.slots, outage.old_incarnations, strict=True))

    def newer(v) -> bool:
        return all((v.incarnation(s) or 0) > (old or 0) for s, old in pairs)

    return {
        "removed": next((t for t, v in after if set(outage.slots) - set(v.members)), None),
        "back": next((t for t, v in after if newer(v)), None),
        "whole": next(
            (t for t, v in after if len(v.members) == outage.num_slots and newer(v)), None
        ),
    }


def build_timeline(
    outage: Outage,
    times: list[float],
    curve: Curve,
    pre_rate: float,
    window_s: float,
    events: list[dict],
    views: list[tuple[float, object]],
) -> Timeline:
    """The phases after the fault. With several failed slots: detection and the view without
    them are the first, start-up phases and the rejoin the last (the instance is whole again).
    The time to 95% is read on the served curve from the fault on, over a sustained window."""
    kill, slots = outage.fault_at, outage.slots
    marks = view_marks(outage, views)
    back = marks["back"]

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - kill, 4)

    tl = Timeline(view_committed=rel(marks["removed"]), rejoined=rel(back))
    tl.all_in_view = rel(marks["whole"])
    detected = [
        ev["mono"]
        for s in slots
        if (ev := first_event(events, "lease_released", kill, f"supervisor{s}", slot=s))
    ]
    tl.detected = rel(min(detected)) if detected else tl.view_committed
    failed = "|".join(str(s) for s in slots)
    ev = first_event(events, "resumed", kill, rf"worker(?!(?:{failed})\.)\d+\.\d+")
    tl.survivors_resumed = rel(ev["mono"]) if ev else None
    if marks["removed"] is not None:
        tl.first_token = rel(next((t for t in times if t > marks["removed"]), None))

    def last(name: str, process: str) -> dict | None:
        found = [first_event(events, name, kill, process.format(s), slot=s) for s in slots]
        return None if None in found else max(found, key=lambda ev: ev["mono"])

    ev = last("worker_started", r"worker{}\.\d+")
    tl.process_up = rel(ev["mono"]) if ev else None
    ev = last("weights_loaded", r"worker{}\.\d+")
    if ev:
        tl.weights_loaded = rel(ev["mono"])
        tl.weights = {k: ev.get(k) for k in ("bytes", "seconds", "gbps", "sources", "from_disk")}
    ev = last("ready", "supervisor{}")
    tl.ready = rel(ev["mono"]) if ev else None
    gap = longest_gap(times, kill, back if back is not None else math.inf)
    if gap:
        tl.service_back, tl.outage_s = rel(gap[1]), round(gap[1] - gap[0], 4)
    if back is not None:  # after the outage: the survivors' pause to admit the slot
        since = gap[1] if gap else kill
        rejoin_gap = longest_gap(times, max(back - 1.0, since), back + 10.0)
        tl.reintegration_gap_s = round(rejoin_gap[1] - rejoin_gap[0], 4) if rejoin_gap else None
    window = max(1, round(window_s / curve.bin_s))
    tl.throughput_95 = rel(time_back(curve, kill, 0.95 * pre_rate, window))
    return tl


def dip(curve: Curve, pre: tuple[float, float], outage: Outage, rejoin_at: float | None) -> dict:
    """How deep the served curve fell between the fault and the rejoin (bins wholly inside),
    against the pre-fault window ``pre`` = ``(start, end)``: the mean and the lowest bin as
    fractions of the pre-fault median, and the survivors' own tokens/s against theirs before
    (above 1: they took up the failed slot's load; below: they slowed down too)."""
    end = math.inf if rejoin_at is None else rejoin_at
    inside = _bins_within(curve, outage.fault_at, end)
    before = _bins_within(curve, *pre)
    pre_rate = statistics.median([curve.total[i] for i in before]) if before else 0.0
    out = {"outage_mean_frac": None, "outage_min_frac": None, "outage_bins": len(inside)}
    if inside and pre_rate > 0:
        served = [curve.total[i] for i in inside]
        out["outage_mean_frac"] = round(statistics.fmean(served) / pre_rate, 4)
        out["outage_min_frac"] = round(min(served) / pre_rate, 4)
    survivors = [s for s in curve.per_slot if s not in outage.slots]
    during, ahead = _slots_mean(curve, survivors, inside), _slots_mean(curve, survivors, before)
    ok = during is not None and ahead
    out["survivors_frac"] = round(during / ahead, 4) if ok else None
    return out


def _bins_within(curve: Curve, t0: float, t1: float) -> list[int]:
    return [i for i in range(len(curve.total)) if t0 <= curve.start(i) and curve.start(i + 1) <= t1]


def _slots_mean(curve: Curve, slots: list[int], bins: list[int]) -> float | None:
    """Mean over ``bins`` of the summed tokens/s of ``slots`` (bins a poll missed left out)."""
    sums = [
        sum(curve.per_slot[s][i] for s in slots)
        for i in bins
        if all(curve.per_slot[s][i] is not None for s in slots)
    ]
    return statistics.fmean(sums) if sums and slots else None


def summarize(values: list[float | None]) -> dict:
    """Median and max over repeated runs of one figure (runs that lack it are left out)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "max": None, "n": 0}
    return {"median": _round(statistics.median(xs)), "max": _round(max(xs)), "n": len(xs)}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)
