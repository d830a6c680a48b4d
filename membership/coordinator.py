"""The membership coordinator: turns registrations into committed views.

Run one or more; they elect a leader (``election``). The leader is level-triggered: on every
change under ``slots/`` (after a short debounce that batches concurrent failures) and on a
periodic tick, it compares the registered slots with the committed view and commits the next
epoch when they differ:
- a member whose record is gone, or whose record is a newer incarnation, leaves the view;
- a slot registered ``ready`` outside the view (or as a newer incarnation) joins it, unless it
  is in quarantine after an exclusion by suspicion;
- with no membership change, members that ask for a newer view (``resync_epoch``) get a plain
  resync the first time, and in the view that resync produced, an exclusion by vote of the
  slots they suspect (``suspicion``: the rule, its time bound, and the quarantine, which is
  this leader's memory only: a failover forgets it, costing at most one more round).
Every commit is fenced by the leader's election key, so a deposed leader cannot commit.

After an etcd outage the leader waits ``outage_grace_s`` (from the last failure it saw)
before it takes a *vanished* record for a departure: a global outage can expire every slot's
lease at once, and their supervisors re-attach the same incarnations as soon as etcd answers
(design.md 5.8). A record that names another incarnation still removes the old one at once.

Bad data in etcd never stops it: a malformed slot record (wrong types, a slot other than its
key's or outside ``num_slots``, no lease) is logged once and counts as absent, so the view is
committed for the well-formed slots; a ``view`` the history does not hold is replaced
(``commit_next``); an election key bound to no lease is deleted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .commit import CommitResult, FenceFailed, commit_next
from .election import Election
from .errors import (
    EtcdUnavailable,
    LeaseLost,
    MalformedView,
    MembershipError,
    StaleView,
    WatchBroken,
    WatchCompacted,
    clip,
)
from .etcd import EtcdClient, cmp_mod, op_delete
from .keys import Keys
from .registry import SlotRecord, SlotState, read_slots
from .session import Session, SessionConfig
from .suspicion import Action, Decision, Quarantine, SuspicionRounds
from .view import View

log = logging.getLogger(__name__)

# members (sorted slots) and the previous view -> the placement payload of the next view
Planner = Callable[[Sequence[int], View | None], Any]


def keep_placement(members: Sequence[int], previous: View | None) -> Any:
    """The default planner: the placement is the runtime's business; carry it over."""
    return previous.placement if previous else None


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    ttl_s: int = 3
    debounce_s: float = 0.1
    max_debounce_s: float = 0.5
    resync_s: float = 1.0  # level-triggered re-check even when no event arrives
    identity: str = ""
    initial_members: int = 1  # the first view waits for this many ready slots
    num_slots: int | None = None  # the cluster's, where known: records of other slots are bad
    # how long after an etcd failure a vanished record is not yet a departure (None: TTL + 2 s,
    # time for every supervisor to see that etcd is back and re-attach)
    outage_grace_s: float | None = None
    # data-plane suspicion (``suspicion``): a slot excluded by vote stays out this long,
    # doubling per further exclusion up to the max, forgotten after reset_s in the views; a
    # repeat round votes once every member asked, or collect_s after the first request
    suspect_quarantine_s: float = 10.0
    suspect_quarantine_max_s: float = 60.0
    suspect_reset_s: float = 60.0
    suspect_collect_s: float = 1.0

    @property
    def grace_s(self) -> float:
        return self.ttl_s + 2.0 if self.outage_grace_s is None else self.outage_grace_s

    def __post_init__(self) -> None:
        if self.num_slots is not None and self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}.")
        if not 0 <= self.debounce_s <= self.max_debounce_s:
            raise ValueError(
                f"debounce {self.debounce_s} s must be >= 0 and <= max_debounce "
                f"{self.max_debounce_s} s."
            )
        if not 0 <= self.suspect_quarantine_s <= self.suspect_quarantine_max_s:
            raise ValueError(
                f"suspect quarantine {self.suspect_quarantine_s} s must be >= 0 and <= its max "
                f"{self.suspect_quarantine_max_s} s."
            )
        if self.suspect_reset_s < 0 or self.suspect_collect_s < 0:
            raise ValueError("suspect_reset_s and suspect_collect_s must be >= 0.")


def next_members(
    current: View | None, records: dict[int, SlotRecord], hold_vanished: bool = False
) -> tuple[dict[int, int], list[int], list[int]]:
    """Pure reconciliation: ``({slot: incarnation}, removed, added)`` for the next view.
    ``hold_vanished``: a member whose record is gone stays (just after an etcd outage); one
    whose record names another incarnation leaves all the same."""
    members = dict(current.incarnations) if current else {}
    removed = sorted(
        s
        for s, inc in members.items()
        if (s not in records and not hold_vanished)
        or (s in records and records[s].incarnation != inc)
    )
    for s in removed:
        del members[s]
    added = sorted(
        s for s, rec in records.items() if rec.state is SlotState.READY and s not in members
    )
    for s in added:
        members[s] = records[s].incarnation
    return members, removed, added


class Coordinator:
    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        planner: Planner = keep_placement,
        config: CoordinatorConfig | None = None,
    ):
        self.client, self.keys, self.planner = client, keys, planner
        self.config = config or CoordinatorConfig()
        self.is_leader = threading.Event()
        self.commits = 0
        self._stop = threading.Event()
        self._last_failure = 0.0  # monotonic time of the last etcd failure seen (0: none)
        self._session: Session | None = None
        self._election: Election | None = None
        self._held: tuple[int, ...] = ()
        self.suspicion = SuspicionRounds(
            self.config.suspect_collect_s,
            Quarantine(
                self.config.suspect_quarantine_s,
                self.config.suspect_quarantine_max_s,
                self.config.suspect_reset_s,
            ),
        )
        self._quarantined: set[tuple[int, int]] = set()  # (slot, incarnation) said held back

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Campaign, lead, and campaign again after losing a session, until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                with Session(
                    self.client, SessionConfig(ttl_s=self.config.ttl_s), name="coordinator"
                ) as session:
                    self._session = session
                    election = Election(
                        self.client, self.keys.coordinator, session, self.config.identity
                    )
                    self._election = election
                    if self._campaign(election):
                        self._lead(session, election)
                    elif session.loss is not None:  # the session ended while campaigning
                        self._last_failure = time.monotonic()
                    if self._stop.is_set():
                        election.resign()
            except (EtcdUnavailable, LeaseLost, FenceFailed) as exc:
                log.warning("coordinator: %s; campaigning again", exc)
                if not isinstance(exc, FenceFailed):
                    self._last_failure = time.monotonic()
                self._stop.wait(0.2)
            except (MalformedView, StaleView) as exc:
                # not a crash loop: say what is wrong, then look again (the epochs are spent,
                # or another writer commits without leadership)
                log.error(
                    "coordinator: cannot commit the next view: %s (see `eep inspect`); "
                    "retrying in %.0f s",
                    exc,
                    self.config.resync_s * 5,
                )
                self._stop.wait(self.config.resync_s * 5)
            finally:
                self.is_leader.clear()

    def _campaign(self, election: Election) -> bool:
        """Campaign; meanwhile, delete an election key bound to no lease. The leader's key is
        always lease-bound; one that is not was written by hand, would never expire, and
        every coordinator would wait for it forever. Its value is never read."""
        done = threading.Event()
        sweeper = threading.Thread(
            target=self._sweep_election_key, args=(done,), name="election-sweep", daemon=True
        )
        sweeper.start()
        try:
            return election.campaign(self._stop)
        finally:
            done.set()
            sweeper.join(timeout=5)

    def _sweep_election_key(self, done: threading.Event) -> None:
        key = self.keys.coordinator
        while not self._stop.is_set():
            try:
                kv = self.client.get(key)
                if kv is not None and kv.lease == 0:
                    log.warning(
                        "%s is bound to no lease, so no coordinator wrote it and it would never "
                        "expire; deleting it: %s",
                        key,
                        clip(kv.value),
                    )
                    self.client.txn([cmp_mod(key, kv.mod_revision)], [op_delete(key)])
            except MembershipError as exc:
                log.debug("election key check: %s", exc)
            if done.wait(self.config.resync_s):
                return

    def _lead(self, session: Session, election: Election) -> None:
        self.is_leader.set()
        revision = self.reconcile(election)
        while not self._stop.is_set():
            session.check()
            try:
                stream = self.client.watch(self.keys.slots, revision + 1, prefix=True)
            except EtcdUnavailable:
                self._last_failure = time.monotonic()
                self._stop.wait(0.2)
                continue
            try:
                revision = self._follow(stream, session, election, revision)
            except (WatchBroken, WatchCompacted, EtcdUnavailable) as exc:
                log.info("coordinator: slot watch interrupted (%s); resyncing", exc)
                if not isinstance(exc, WatchCompacted):  # a member lost or leaderless
                    self._last_failure = time.monotonic()
                self._stop.wait(0.1)
                revision = self.reconcile(election)
            finally:
                stream.close()

    def _follow(self, stream, session: Session, election: Election, revision: int) -> int:
        last_sync = time.monotonic()
        while not self._stop.is_set():
            session.check()
            batch = stream.get(min(0.25, self.config.resync_s))
            if batch is not None:
                revision = max(revision, batch.revision)
                self._debounce(stream)
            if batch is not None or time.monotonic() - last_sync >= self.config.resync_s:
                revision = max(revision, self.reconcile(election))
                last_sync = time.monotonic()
        return revision

    def _debounce(self, stream) -> None:
        """Absorb the events that follow within ``debounce_s`` (bounded by max_debounce_s)."""
        end = time.monotonic() + self.config.max_debounce_s
        while True:
            left = min(self.config.debounce_s, end - time.monotonic())
            if left <= 0 or stream.get(left) is None:
                return

    def _in_grace(self) -> bool:
        """Whether an etcd failure (this process's own requests, its campaign, a broken
        watch, or its session's renewals) was seen less than ``grace_s`` ago."""
        last = max(
            self._last_failure,
            self._session.last_failure if self._session else 0.0,
            self._election.last_failure if self._election else 0.0,
        )
        return bool(last) and time.monotonic() - last < self.config.grace_s

    def _say_held(self, held: list[int]) -> None:
        if held and tuple(held) != self._held:
            log.warning(
                "slots %s have no record just after an etcd outage; keeping them in the view "
                "for up to %.1f s while their supervisors re-attach",
                held,
                self.config.grace_s,
            )
        self._held = tuple(held)

    def _quarantine(self, members: dict[int, int], added: list[int], now: float) -> list[int]:
        """``added`` less the slots in quarantine (dropped from ``members``), said once each."""
        quarantine = self.suspicion.quarantine
        for s in [s for s in added if quarantine.holds(s, members[s], now)]:
            if (s, members[s]) not in self._quarantined:
                self._quarantined.add((s, members[s]))
                log.warning(
                    "slot %d (incarnation %d) is ready but was excluded by suspicion; not "
                    "admitted for another %.1f s",
                    s,
                    members[s],
                    quarantine.left_s(s, now),
                )
            del members[s]
        return [s for s in added if s in members]

    def reconcile(self, election: Election) -> int:
        """Commit the next view if the registrations call for one; returns the read revision."""
        records, revision = read_slots(self.client, self.keys, self.config.num_slots)
        hold = self._in_grace()
        now = time.monotonic()
        seen: list[View | None] = [None]  # the view the last decide() built on
        chose: list[Decision | None] = [None]  # and its answer to resync requests (None: none)

        def decide(current: View | None) -> View | None:
            members, removed, added = next_members(current, records, hold_vanished=hold)
            if hold and current is not None:
                self._say_held(sorted(s for s in current.members if s not in records))
            added = self._quarantine(members, added, now)
            seen[0], chose[0] = current, None
            if not removed and not added:  # no membership change: answer resync requests
                chose[0] = decision = self.suspicion.decide(current, records, now)
                if decision.action in (Action.NONE, Action.WAIT):
                    return None
                for s in decision.exclude if decision.action is Action.EXCLUDE else ():
                    del members[s]
            if current is None and len(members) < self.config.initial_members:
                return None
            reason = "; ".join(
                part
                for part in (
                    f"removed {removed}" if removed else "",
                    f"added {added}" if added else "",
                    chose[0].reason if chose[0] is not None else "",
                )
                if part
            )
            placement = self.planner(tuple(sorted(members)), current)
            if current is None:
                return View(
                    epoch=1,
                    members=tuple(sorted(members)),
                    incarnations=tuple(members.items()),
                    placement=placement,
                    reason=reason,
                )
            return current.next(members, placement, reason)

        result: CommitResult = commit_next(self.client, self.keys, decide, fence=election.fence())
        if result.committed and result.view is not None:
            self.commits += 1
            log.info(
                "committed epoch %d members %s (%s)",
                result.view.epoch,
                list(result.view.members),
                result.view.reason,
            )
            excluded = self.suspicion.committed(seen[0], result.view, chose[0], now)
            for s, period in excluded.items():
                log.warning("slot %d excluded by suspicion; quarantined for %.0f s", s, period)
        if result.view is not None:
            self.suspicion.quarantine.observe(result.view.members, time.monotonic())
        return revision
