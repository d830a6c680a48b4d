"""The invariants ``eep bench chaos`` checks after every run, from what the run left behind.

A run leaves: the client's streams (every token with its arrival time, monotonic), the
committed view history in etcd, the views the bench's watcher saw (with the monotonic time
each arrived), the processes' event files and the front-end's counters before and after.
Each function below turns one of those into a count that must be 0; the definitions are in
``eep.tools.bench_chaos``'s docstring.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from eep.placement import Placement

# Columns of the table, in order; every one must sum to 0.
INVARIANTS = ("lost", "dup_skip", "differ", "stale", "epochs", "orphans", "collateral")

# A token a member computed just before it applied an orphaning view is still in the
# front-end's and the client's pipes for a moment after; arrivals this soon after the last
# member applied such a view are not counted against it.
PIPE_GRACE_S = 0.5


@dataclass(frozen=True)
class RunSpan:
    """The run's window and the history it is judged against."""

    t0: float  # monotonic: the load started
    t1: float  # monotonic: the load drained
    epoch_before: int  # the committed epoch when the run started
    num_slots: int


def stream_counts(streams, expected: list[list[int]]) -> dict[str, int]:
    """``lost``, ``dup_skip`` and ``differ`` over the client's streams.

    A stream is lost if it ended with an error, never ended, or got fewer tokens than the
    reference. Against the reference, every token past the common prefix is duplicated or
    skipped, and so is every reference token missing from a stream that ended cleanly.
    """
    lost = dup_skip = differ = 0
    for st in streams:
        want = expected[st.prompt_idx]
        prefix = _common_prefix(st.tokens, want)
        clean = st.done and st.error is None
        lost += (not clean) or len(st.tokens) < len(want)
        dup_skip += len(st.tokens) - prefix + (len(want) - prefix if clean else 0)
        differ += clean and st.tokens != want
    return {"lost": lost, "dup_skip": dup_skip, "differ": differ}


def _common_prefix(a: list[int], b: list[int]) -> int:
    pairs = zip(a, b, strict=False)  # the shorter one ends the prefix
    return sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1], pairs))


def run_views(history, span: RunSpan) -> list:
    """The committed views of this run (epoch above the one it started at)."""
    return [v for v in history if v.epoch > span.epoch_before]


def epoch_violations(history, seen: list[tuple[float, object]], span: RunSpan) -> int:
    """Epochs forked or skipped: the run's committed epochs must be exactly consecutive from
    the one it started at; the views the watcher delivered must go up by one each time; and
    each delivered view must be the history's view of that epoch (else two views of one
    epoch existed: a fork)."""
    epochs = [v.epoch for v in run_views(history, span)]
    bad = sum(e != span.epoch_before + 1 + i for i, e in enumerate(epochs))
    delivered = [v for _, v in seen]
    bad += sum(b.epoch != a.epoch + 1 for a, b in itertools.pairwise(delivered))
    by_epoch = {v.epoch: v for v in history}
    for v in delivered:
        known = by_epoch.get(v.epoch)
        bad += known is None or (known.incarnations, known.placement) != (
            v.incarnations,
            v.placement,
        )
    return bad


def orphan_violations(
    history, seen: list[tuple[float, object]], events: list[dict], token_times, span: RunSpan
) -> tuple[int, list[dict]]:
    """Views that orphan an expert but were not treated as degraded; returns the count and
    one record per orphaning view.

    The view carries no 'degraded' mark: each member derives it from the placement, as
    ``Worker.apply`` does, and pauses. So a violation is an orphaning view that a member
    applied without logging ``degraded`` for it, or during which the client received a
    token (from :data:`PIPE_GRACE_S` after the last member applied it until the next view
    arrived)."""
    arrived = {v.epoch: t for t, v in seen}
    records, bad = [], 0
    for v in run_views(history, span):
        orphans = Placement.from_json(v.placement).orphans
        if not orphans:
            continue
        applied = _events_at(events, "view_applied", v.epoch)
        marked = {e["slot"] for e in _events_at(events, "degraded", v.epoch)}
        unmarked = sorted({e["slot"] for e in applied} - marked)
        start = max([e["mono"] for e in applied] or [arrived.get(v.epoch, span.t0)])
        end = arrived.get(v.epoch + 1, span.t1)
        tokens = sum(start + PIPE_GRACE_S <= t < end for t in token_times)
        violated = bool(unmarked) or tokens > 0
        bad += violated
        records.append(
            {
                "epoch": v.epoch,
                "orphans": list(orphans),
                "members_not_degraded": unmarked,
                "tokens_during": tokens,
                "violation": violated,
            }
        )
    return bad, records


def collateral_exits(history, span: RunSpan, faulted: set[tuple[int, int]]) -> list[list[int]]:
    """``[slot, incarnation]`` of members that left a view during the run though no fault
    hit them (``faulted``: the ``(slot, incarnation)`` pairs the run's faults took out): a
    survivor that crashed, was fenced or lost its lease on the way is a failure the other
    invariants can miss, since the load then recovers around it too."""
    views = [v for v in history if v.epoch >= span.epoch_before]
    out = []
    for prev, cur in itertools.pairwise(views):
        for slot, inc in prev.incarnations:
            if cur.incarnation(slot) != inc and (slot, inc) not in faulted:
                out.append([slot, inc])
    return out


def _events_at(events: list[dict], name: str, epoch: int) -> list[dict]:
    return [e for e in events if e["event"] == name and e.get("epoch") == epoch]


def fault_timings(fault, history, wall_offset: float, num_slots: int) -> dict[str, float | None]:
    """Seconds from ``fault`` to the commit of the first view without its slot's old
    incarnation (``excluded_s``) and of the first full view with a newer one
    (``rejoined_s``); commit times are wall clock, ``wall_offset`` maps them to monotonic."""

    def first(pred) -> float | None:
        for v in history:
            if v.epoch > fault.epoch_before and pred(v):
                return round(v.committed_at - wall_offset - fault.at, 3)
        return None

    old = fault.old_incarnation or 0
    return {
        "excluded_s": first(lambda v: v.incarnation(fault.slot) != fault.old_incarnation),
        "rejoined_s": first(
            lambda v: (v.incarnation(fault.slot) or 0) > old and len(v.members) == num_slots
        ),
    }
