"""Data-plane suspicion: which members to exclude when their exchanges keep failing while every
lease lives (a data-plane-only partition; design.md 5.10). Pure: no etcd, the clock passed in.

A worker whose exchange failed and saw no newer view within TTL + 1 s asks for one
(``SlotRecord.resync_epoch``) and names the slots that did not arrive (``suspects``). The
leader answers a member's request for epoch E (:class:`SuspicionRounds`):
- the first time in E: a plain resync, a view with the same members (a slow peer gets another
  chance; the view resets every fabric's step counter);
- if members ask again in the view that resync produced, with suspects both times: exclusion
  by host where every suspicion crosses hosts (:func:`exclude_hosts`), else by vote
  (:func:`exclude_by_vote`). It votes once every member whose record still names its
  incarnation has asked, or ``collect_s`` after the first request of the round, whichever
  comes first, so a round's requests that arrive apart are counted together;
- a request without suspects (the peer was in a newer epoch, or a mailbox was torn) is always
  answered with a plain resync.

**The bound.** From the first step that needs a cut peer to the view that excludes it:
``<= 2 x (exchange_timeout_s + ttl_s + 1 s) + 2 x max_debounce_s``, and
``+ collect_s + resync_s`` when some member never asks (an idle one): per round, the exchange
times out, the worker waits TTL + 1 s, its supervisor copies the request within a 20 ms turn,
and the leader commits after its debounce. Add the step time, the watch delivery and the etcd
writes (milliseconds). With the defaults: 13 s on CPU (exchange 2 s, TTL 3 s), 10 s on GPU.

**Quarantine** (:class:`Quarantine`): a slot excluded by suspicion is not re-admitted, even as a
new incarnation registered ``ready``, for ``base_s`` (doubling with each further exclusion of
the slot, at most ``max_s``); the slot's count is forgotten once it has stayed in committed
views for ``reset_s``. The incarnation that was excluded is never re-admitted. This is the
leader's memory only: a coordinator that takes over forgets it, and also which view was a
suspicion resync, so the worst case after a failover is one more suspicion round and an early
re-admission (which the next rounds exclude again).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .registry import SlotRecord
from .view import View


def resync_requests(current: View | None, records: dict[int, SlotRecord]) -> list[int]:
    """Members that asked for a view newer than the committed one (data-plane suspicion that
    no membership change has answered: a slow peer, not a dead one)."""
    if current is None:
        return []
    return sorted(
        s
        for s in current.members
        if s in records
        and records[s].incarnation == current.incarnation(s)
        and records[s].resync_epoch >= current.epoch
    )


def exclude_by_vote(members: Iterable[int], reports: Mapping[int, Iterable[int]]) -> list[int]:
    """The members to exclude, in the order they are picked.

    ``reports``: the slots each reporting member suspects. Two members are in conflict when
    either suspects the other (self-suspicion and non-members are ignored); a member's votes
    are the remaining members it is in conflict with. Repeatedly exclude the member with the
    most votes and drop its conflicts, until no two remaining members are in conflict. Ties go
    first to a member in conflict with the lowest-numbered remaining member, then to the
    higher slot number: that member is never excluded on a tie, so the side that holds it
    survives a perfect tie, and one member always remains (an exclusion needs a conflict with a
    member that stays).

    Counting both directions equals counting who suspects a slot when both sides report, and
    keeps a side that does not report (idle ranks never step, so never time out) from being
    voted out by a lone reporter that suspects all of it.
    """
    remaining = set(members)
    conflicts: dict[int, set[int]] = {s: set() for s in remaining}
    for reporter, suspects in reports.items():
        if reporter not in remaining:
            continue
        for s in suspects:
            if s in remaining and s != reporter:
                conflicts[reporter].add(s)
                conflicts[s].add(reporter)
    excluded = []
    while any(conflicts[s] for s in remaining):
        lowest = min(remaining)
        pick = max(remaining, key=lambda s: (len(conflicts[s]), s in conflicts[lowest], s))
        remaining.discard(pick)
        for other in conflicts.pop(pick):
            conflicts[other].discard(pick)
        excluded.append(pick)
    return excluded


def exclude_hosts(
    members: Iterable[int], reports: Mapping[int, Iterable[int]], host_of: Mapping[int, str]
) -> list[int] | None:
    """Exclusion by host, where every conflict is between slots of different hosts (a host cut
    from its peers, the common case across hosts); ``None`` otherwise (then
    :func:`exclude_by_vote` decides slot by slot).

    Two hosts are in conflict when a slot of one suspects a slot of the other. Repeatedly
    exclude the host in conflict with the most remaining hosts and drop its conflicts, until
    none is left. Ties go to the host with fewer members, then to a host that does not hold the
    lowest-numbered member: a host cut from two others goes, and of two hosts cut from each
    other (a symmetric partition nobody can tell apart) the one with the lowest slot stays,
    whichever side reported first. Returns every slot of the hosts excluded.
    """
    members = set(members)
    if not members <= set(host_of):
        return None
    edges: set[frozenset[str]] = set()
    for reporter, suspects in reports.items():
        if reporter not in members:
            continue
        for s in suspects:
            if s in members and s != reporter:
                if host_of[s] == host_of[reporter]:
                    return None  # a conflict inside a host: not a partition between hosts
                edges.add(frozenset((host_of[s], host_of[reporter])))
    slots_of: dict[str, set[int]] = {}
    for s in members:
        slots_of.setdefault(host_of[s], set()).add(s)
    excluded: list[int] = []
    while edges:
        lowest_host = host_of[min(s for h in slots_of for s in slots_of[h])]
        degree = {h: sum(h in e for e in edges) for h in slots_of}
        pick = max(slots_of, key=lambda h: (degree[h], -len(slots_of[h]), h != lowest_host, h))
        excluded.extend(sorted(slots_of.pop(pick)))
        edges = {e for e in edges if pick not in e}
    return excluded


class Action(enum.Enum):
    NONE = "none"  # nobody asks
    RESYNC = "resync"  # a view with the same members
    WAIT = "wait"  # a repeat round: wait for the other members' requests
    EXCLUDE = "exclude"  # a view without ``exclude``


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    asked: tuple[int, ...] = ()  # members asking for a newer view
    reports: dict[int, tuple[int, ...]] = field(default_factory=dict)  # reporter -> suspects
    exclude: tuple[int, ...] = ()

    @property
    def reason(self) -> str:
        if self.action is Action.EXCLUDE:
            said = ", ".join(f"{r}: {list(s)}" for r, s in sorted(self.reports.items()))
            return f"excluded by suspicion: {sorted(self.exclude)} (suspects {{{said}}})"
        if self.reports:
            return f"resync asked by {list(self.asked)} suspecting {sorted(_union(self))}"
        return f"resync asked by {list(self.asked)}"


def _union(decision: Decision) -> set[int]:
    return {s for suspects in decision.reports.values() for s in suspects}


@dataclass(slots=True)
class _Strikes:
    count: int  # exclusions by suspicion not yet forgotten
    until: float  # not admitted before this (monotonic s)
    incarnation: int  # the excluded incarnation: never admitted again (nor older ones)
    since: float | None = None  # in committed views since (None: not a member now)


class Quarantine:
    """Slots excluded by suspicion, kept out for a while (see the module's docstring)."""

    def __init__(self, base_s: float = 10.0, max_s: float = 60.0, reset_s: float = 60.0):
        self.base_s, self.max_s, self.reset_s = base_s, max_s, reset_s
        self._slots: dict[int, _Strikes] = {}

    def exclude(self, slot: int, incarnation: int, now: float) -> float:
        """Record the exclusion of ``slot`` (as ``incarnation``); returns its quarantine, s."""
        count = self._slots[slot].count + 1 if slot in self._slots else 1
        period = min(self.max_s, self.base_s * 2 ** min(count - 1, 32))
        self._slots[slot] = _Strikes(count, now + period, incarnation)
        return period

    def holds(self, slot: int, incarnation: int, now: float) -> bool:
        """Whether ``slot`` registered as ``incarnation`` must stay out now."""
        strikes = self._slots.get(slot)
        return strikes is not None and (now < strikes.until or incarnation <= strikes.incarnation)

    def left_s(self, slot: int, now: float) -> float:
        strikes = self._slots.get(slot)
        return max(0.0, strikes.until - now) if strikes else 0.0

    def strikes(self, slot: int) -> int:
        return self._slots[slot].count if slot in self._slots else 0

    def observe(self, members: Iterable[int], now: float) -> None:
        """The members of the committed view now: a slot that stayed ``reset_s`` is forgotten."""
        members = set(members)
        for slot, strikes in list(self._slots.items()):
            if slot not in members:
                strikes.since = None
            elif strikes.since is None:
                strikes.since = now
            elif now - strikes.since >= self.reset_s:
                del self._slots[slot]


class SuspicionRounds:
    """The leader's answer to resync requests, round by round (see the module's docstring)."""

    def __init__(self, collect_s: float = 1.0, quarantine: Quarantine | None = None):
        self.collect_s = collect_s
        self.quarantine = quarantine or Quarantine()
        self._resync_epoch: int | None = None  # the last view committed as a suspicion resync
        self._first_ask: tuple[int, float] | None = None  # (epoch, when) of a repeat round

    def decide(self, current: View | None, records: dict[int, SlotRecord], now: float) -> Decision:
        asked = resync_requests(current, records)
        if current is None or not asked:
            return Decision(Action.NONE)
        members = set(current.members)
        reports = {}
        for s in asked:
            suspects = tuple(x for x in records[s].suspects if x in members and x != s)
            if suspects:
                reports[s] = suspects
        if not reports or current.epoch != self._resync_epoch:
            return Decision(Action.RESYNC, tuple(asked), reports)
        host_of = {s: records[s].host for s in members if s in records}
        by_host = exclude_hosts(current.members, reports, host_of)
        exclude = tuple(by_host if by_host is not None else exclude_by_vote(members, reports))
        live = {
            s for s in members if s in records and records[s].incarnation == current.incarnation(s)
        }
        if not live <= set(asked):
            if self._first_ask is None or self._first_ask[0] != current.epoch:
                self._first_ask = (current.epoch, now)
            if now - self._first_ask[1] < self.collect_s:
                return Decision(Action.WAIT, tuple(asked), reports, exclude)
        return Decision(Action.EXCLUDE, tuple(asked), reports, exclude)

    def committed(
        self, previous: View | None, view: View, decision: Decision | None, now: float
    ) -> dict[int, float]:
        """``view`` was committed on ``decision`` (None: a membership change). Returns
        ``{slot: quarantine s}`` of the slots it excluded by suspicion."""
        self._resync_epoch = None
        if decision is not None and decision.action is Action.RESYNC and decision.reports:
            self._resync_epoch = view.epoch
        if decision is None or decision.action is not Action.EXCLUDE or previous is None:
            return {}
        return {
            s: self.quarantine.exclude(s, previous.incarnation(s) or 0, now)
            for s in decision.exclude
        }
