"""Where requests run: pure decisions over the request log and the live slots, no I/O.

- :func:`least_loaded`: a new or re-queued request goes to the live slot with the fewest
  requests in flight (ties: the lowest slot);
- :func:`pick_slot`: the same, among the slots whose KV has room for the request now: the
  front-end never gives a rank more than its KV cache holds, so what does not fit anywhere
  waits in the front-end's bounded queue instead of in a rank's unbounded one;
- :func:`stranded`: the requests a committed view takes away from their slot (the slot left
  the view, or a new incarnation of it was admitted), to be re-queued on survivors;
- :func:`rebalance_moves`: the running requests to move onto a slot that (re)joined, with
  their KV, until its load is the fair share: a restarted rank serves the existing load, not
  only new requests.
"""

from __future__ import annotations

from collections.abc import Iterable

from eep.membership.view import View

from .request_log import Record, RequestState


def load_per_slot(live: Iterable[int], records: Iterable[Record]) -> dict[int, int]:
    """Requests in flight on each live slot (queued ones count nowhere)."""
    load = dict.fromkeys(live, 0)
    for rec in records:
        if rec.slot in load:
            load[rec.slot] += 1
    return load


def least_loaded(live: list[int], in_flight: Iterable[Record]) -> int | None:
    """The slot a request should go to; None when no slot is live."""
    if not live:
        return None
    load = load_per_slot(live, in_flight)
    return min(live, key=lambda s: (load[s], s))


def blocks_for(tokens: int, block_size: int) -> int:
    """KV blocks of ``block_size`` tokens that ``tokens`` tokens take."""
    return -(-tokens // block_size)


def pick_slot(
    live: list[int],
    in_flight: Iterable[Record],
    need: int,
    capacity: int,
    block_size: int,
    exclude: Iterable[int] = (),
) -> int | None:
    """The least loaded live slot (:func:`least_loaded`) whose KV has room for ``need`` more
    tokens, counting what the requests assigned to each slot reserve there (``capacity``
    blocks of ``block_size`` tokens per slot); None when no slot has room. Slots in
    ``exclude`` (they refused the request) are passed over."""
    skip = set(exclude)
    candidates = [s for s in live if s not in skip]
    used = dict.fromkeys(candidates, 0)
    load = dict.fromkeys(candidates, 0)
    for rec in in_flight:
        if rec.slot in used and rec.state is RequestState.RUNNING:
            used[rec.slot] += blocks_for(rec.context, block_size)
            load[rec.slot] += 1
    room = [s for s in candidates if used[s] + blocks_for(need, block_size) <= capacity]
    return min(room, key=lambda s: (load[s], s)) if room else None


def stranded(view: View, in_flight: Iterable[Record]) -> list[Record]:
    """Requests assigned to a ``(slot, incarnation)`` that ``view`` does not hold."""
    return [
        rec
        for rec in in_flight
        if rec.slot is not None and view.incarnation(rec.slot) != rec.incarnation
    ]


def rebalance_moves(
    target: int, live: list[int], in_flight: Iterable[Record]
) -> list[tuple[Record, int]]:
    """``(record, source slot)`` pairs to move onto ``target`` so that it carries the fair
    share (total running // live slots). Each move takes the newest movable request of the
    most loaded slot (ties: the lowest slot), and stops when no slot carries more than the
    fair share or nothing there can move (a request already migrating stays)."""
    if target not in live:
        return []
    load: dict[int, list[Record]] = {s: [] for s in live}
    for rec in in_flight:
        if rec.slot in load and rec.state is RequestState.RUNNING:
            load[rec.slot].append(rec)
    fair = sum(len(v) for v in load.values()) // len(live)
    moves = []
    while len(load[target]) < fair:
        source = max(live, key=lambda s: (len(load[s]), -s))
        movable = [r for r in load[source] if not r.migrating]
        if len(load[source]) <= fair or not movable:
            break
        rec = movable[-1]
        load[source].remove(rec)
        load[target].append(rec)
        moves.append((rec, source))
    return moves
