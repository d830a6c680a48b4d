"""Slot registration: which process fills which slot, as lease-bound keys in etcd.

``slots/<slot>`` holds a :class:`SlotRecord` bound to the owner's session lease, so a dead
or hung owner's record disappears with its lease. ``incarnations/<slot>`` counts the
processes that ever filled the slot; it is bumped in the same transaction that creates the
record, so incarnations strictly increase across restarts and never repeat.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .commit import read_committed
from .errors import (
    MALFORMED,
    EtcdRequestError,
    Excluded,
    LeaseLost,
    MalformedRecord,
    SlotTaken,
    check_int,
    check_slots,
    check_type,
    clip,
    decode_object,
)
from .etcd import EtcdClient, KeyValue, cmp_create, cmp_lease, cmp_mod, op_delete, op_get, op_put
from .host import this_host
from .keys import Keys, parse_counter
from .session import Session

log = logging.getLogger(__name__)


class SlotState(enum.Enum):
    JOINING = "joining"
    READY = "ready"


@dataclass(frozen=True, slots=True)
class SlotRecord:
    slot: int
    incarnation: int
    pid: int
    host: str
    device: str
    lease_id: int
    state: SlotState
    endpoints: dict[str, Any] = field(default_factory=dict)
    registered_at: float = 0.0
    # data-plane suspicion: "I need a view newer than this epoch" (0: nothing asked), and the
    # slots whose exchanges timed out in that epoch (sorted; JSON: a list; design.md 5.10)
    resync_epoch: int = 0
    suspects: tuple[int, ...] = ()

    def to_json(self) -> str:
        obj = asdict(self)
        obj["state"] = self.state.value
        return json.dumps(obj, sort_keys=True)

    @classmethod
    def from_json(
        cls,
        raw: bytes | str,
        where: str = "slot record",
        *,
        key_slot: int | None = None,
        num_slots: int | None = None,
    ) -> SlotRecord:
        """Decode and validate; anything wrong is a :class:`MalformedRecord` naming ``where``.

        ``key_slot`` is the slot of the key the record was read from: the key is the truth,
        and a body that names another slot is malformed. With ``num_slots`` (the cluster's,
        where known) a slot outside ``[0, num_slots)`` is malformed. Fields this version does
        not know are ignored (a newer supervisor may add some); ``endpoints``,
        ``registered_at``, ``resync_epoch`` and ``suspects`` (sorted distinct slots, below
        ``num_slots`` where known) may be missing.
        """
        obj = decode_object(raw, where, MalformedRecord)
        missing = _REQUIRED - obj.keys()
        if missing:
            raise MalformedRecord(f"{where} lacks the fields {sorted(missing)}.")
        slot = check_int(obj, "slot", where, MalformedRecord)
        if key_slot is not None and slot != key_slot:
            raise MalformedRecord(f"{where} is the key of slot {key_slot} but names slot {slot}.")
        if num_slots is not None and slot >= num_slots:
            raise MalformedRecord(f"{where}: slot {slot} is outside the cluster's {num_slots}.")
        state = check_type(obj, "state", str, where, MalformedRecord)
        if state not in _STATES:
            raise MalformedRecord(
                f"{where}: state must be one of {sorted(_STATES)}, got {clip(state)}."
            )
        obj.setdefault("endpoints", {})
        obj.setdefault("registered_at", 0.0)
        obj.setdefault("resync_epoch", 0)
        obj.setdefault("suspects", [])
        registered_at = check_type(obj, "registered_at", (int, float), where, MalformedRecord)
        if isinstance(registered_at, int) and abs(registered_at) > 2**53:
            raise MalformedRecord(f"{where}: registered_at {clip(registered_at)} is not a time.")
        return cls(
            slot=slot,
            incarnation=check_int(obj, "incarnation", where, MalformedRecord, lo=1),
            pid=check_int(obj, "pid", where, MalformedRecord),
            host=check_type(obj, "host", str, where, MalformedRecord),
            device=check_type(obj, "device", str, where, MalformedRecord),
            lease_id=check_int(obj, "lease_id", where, MalformedRecord),
            state=_STATES[state],
            endpoints=check_type(obj, "endpoints", dict, where, MalformedRecord),
            registered_at=float(registered_at),
            resync_epoch=check_int(obj, "resync_epoch", where, MalformedRecord),
            suspects=check_slots(obj, "suspects", where, MalformedRecord, num_slots),
        )

    @classmethod
    def from_kv(cls, kv: KeyValue, keys: Keys, num_slots: int | None = None) -> SlotRecord:
        """The record of a ``slots/<slot>`` key as etcd holds it: the body must name the key's
        slot and be bound to the lease it names (every supervisor binds its record to its
        session's lease; a record bound to none would never expire)."""
        record = cls.from_json(kv.value, kv.key, key_slot=keys.slot_of(kv.key), num_slots=num_slots)
        if kv.lease == 0:
            raise MalformedRecord(f"{kv.key} is bound to no lease, so it would never expire.")
        if record.lease_id != kv.lease:
            raise MalformedRecord(
                f"{kv.key} names lease {record.lease_id:x} but is bound to lease {kv.lease:x}."
            )
        return record


_REQUIRED = {"slot", "incarnation", "pid", "host", "device", "lease_id", "state"}
_STATES = {s.value: s for s in SlotState}


@dataclass(frozen=True, slots=True)
class SlotScan:
    """One read of ``slots/``: the well-formed records by slot, the read's revision, and the
    keys that were ignored with what is wrong with each."""

    records: dict[int, SlotRecord]
    revision: int
    malformed: dict[str, str]


def scan_slots(
    client: EtcdClient, keys: Keys, num_slots: int | None = None, quiet: bool = False
) -> SlotScan:
    """Every slot record; a malformed one is left out, as if its key were absent, and logged
    once per revision (``quiet``: only listed in ``malformed``)."""
    kvs, revision = client.get_prefix(keys.slots)
    records, malformed = {}, {}
    for kv in kvs:
        try:
            rec = SlotRecord.from_kv(kv, keys, num_slots)
        except MalformedRecord as exc:
            malformed[kv.key] = str(exc)
            if not quiet:
                MALFORMED.warn(log, kv.key, kv.mod_revision, str(exc))
            continue
        records[rec.slot] = rec
    return SlotScan(records, revision, malformed)


def read_slots(
    client: EtcdClient, keys: Keys, num_slots: int | None = None
) -> tuple[dict[int, SlotRecord], int]:
    """Every well-formed slot record (see :func:`scan_slots`) and the read's revision."""
    scan = scan_slots(client, keys, num_slots)
    return scan.records, scan.revision


class SlotRegistration:
    """The record of one slot owned through ``session``.

    Every write is fenced twice: ``session.check()`` on the local monotonic clock, and a
    compare in the transaction that the key is still bound to this session's lease, so a
    process that lost its lease can never write as its old incarnation.
    """

    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        session: Session,
        slot: int,
        device: str = "cpu",
        endpoints: dict[str, Any] | None = None,
    ):
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}.")
        self.client, self.keys, self.session = client, keys, session
        self.slot, self.device = slot, device
        self.endpoints = dict(endpoints or {})
        self.record: SlotRecord | None = None

    def register(self, wait_s: float = 0.0) -> SlotRecord:
        """Take the slot as a new incarnation in state ``joining``.

        If another live lease holds the slot, wait up to ``wait_s`` for it to go (a hung
        predecessor's lease expiring), then raise :class:`SlotTaken`. A record bound to no
        lease was not written by a supervisor and would never go: it is deleted (compared on
        its revision). A counter that is not a number is replaced (compared on its revision)
        by the store revision plus one: every incarnation the counter ever issued was a write
        of its own, so none can be above the revision.
        """
        deadline = time.monotonic() + wait_s
        key, inc_key = self.keys.slot(self.slot), self.keys.incarnation(self.slot)
        while True:
            self.session.check()
            kvs, revision = self.client.range(inc_key)
            inc_kv = kvs[0] if kvs else None
            incarnation = self._next_incarnation(inc_kv, revision)
            record = self._record(incarnation, SlotState.JOINING)
            res = self.client.txn(
                [cmp_create(key, 0), cmp_mod(inc_key, inc_kv.mod_revision if inc_kv else 0)],
                [
                    op_put(key, record.to_json(), self.session.lease_id),
                    op_put(inc_key, str(incarnation)),
                ],
                [op_get(key)],
            )
            if res.succeeded:
                self.record = record
                log.info(
                    "slot %d: registered incarnation %d (pid %d, lease %x)",
                    self.slot,
                    incarnation,
                    record.pid,
                    record.lease_id,
                )
                return record
            holder = res.responses[0][0] if res.responses and res.responses[0] else None
            if holder is None:
                continue  # only the incarnation counter moved: retry at once
            if holder.lease == 0:
                self._delete_foreign(holder)
                continue
            if time.monotonic() >= deadline:
                raise SlotTaken(self._taken_message(holder))
            time.sleep(0.05)

    def _next_incarnation(self, counter: KeyValue | None, revision: int) -> int:
        if counter is None:
            return 1
        try:
            return parse_counter(counter.value, counter.key) + 1
        except MalformedRecord as exc:
            MALFORMED.warn(log, counter.key, counter.mod_revision, str(exc))
            log.warning("slot %d: replacing the counter with %d", self.slot, revision + 1)
            return revision + 1

    def _delete_foreign(self, holder: KeyValue) -> None:
        log.warning(
            "slot %d: %s is bound to no lease, so no supervisor wrote it and it would never "
            "expire; deleting it: %s",
            self.slot,
            holder.key,
            clip(holder.value),
        )
        self.client.txn([cmp_mod(holder.key, holder.mod_revision)], [op_delete(holder.key)])

    def _taken_message(self, holder: KeyValue) -> str:
        try:
            rec = SlotRecord.from_kv(holder, self.keys)
            who = f"pid {rec.pid} on {rec.host}, incarnation {rec.incarnation}"
        except MalformedRecord as exc:
            who = f"an unreadable record ({exc})"
        return (
            f"slot {self.slot} is held by {who}; stop that process or wait for its lease to "
            f"expire (`eep revoke --slot {self.slot}` ends it now)."
        )

    def _record(self, incarnation: int, state: SlotState) -> SlotRecord:
        return SlotRecord(
            slot=self.slot,
            incarnation=incarnation,
            pid=os.getpid(),
            host=this_host().host_id,
            device=self.device,
            lease_id=self.session.lease_id,
            state=state,
            endpoints=self.endpoints,
            registered_at=time.time(),
        )

    def update(
        self,
        state: SlotState | None = None,
        endpoints: dict[str, Any] | None = None,
        resync_epoch: int | None = None,
        suspects: Iterable[int] | None = None,
    ) -> SlotRecord:
        """Rewrite the record (state, endpoints, a resync request and the slots it suspects:
        a new ``resync_epoch`` without ``suspects`` suspects no one); raises
        :class:`LeaseLost` once fenced."""
        assert self.record is not None, "register() first"
        self.session.check()
        if endpoints is not None:
            self.endpoints = dict(endpoints)
        if suspects is None:
            suspects = self.record.suspects if resync_epoch is None else ()
        record = SlotRecord(
            **{
                **asdict(self.record),
                "state": state or self.record.state,
                "endpoints": self.endpoints,
                "resync_epoch": self.record.resync_epoch if resync_epoch is None else resync_epoch,
                "suspects": tuple(sorted(set(suspects))),
            }
        )
        key = self.keys.slot(self.slot)
        try:
            res = self.client.txn(
                [cmp_lease(key, self.session.lease_id)],
                [op_put(key, record.to_json(), self.session.lease_id)],
            )
        except EtcdRequestError as exc:
            raise LeaseLost(f"slot {self.slot}: lease gone while updating ({exc})") from exc
        if not res.succeeded:
            raise LeaseLost(
                f"slot {self.slot}: the record is no longer bound to lease "
                f"{self.session.lease_id:x}; this incarnation ({record.incarnation}) was excluded"
            )
        self.record = record
        return record

    def reattach(self, session: Session) -> SlotRecord:
        """After an etcd outage in which this slot's lease ran out, write the same record
        (same incarnation) again under ``session``'s new lease, and own the slot through it.

        Allowed only while nothing has moved on without this incarnation, all compared in the
        one transaction: the key is still absent, the incarnation counter still names this
        incarnation, and the committed ``view`` (compared on its revision) still lists it, or,
        for a slot still ``joining``, lists no other incarnation of it. Otherwise the
        incarnation is over: :class:`Excluded`. A lost race with another write re-reads."""
        assert self.record is not None, "register() first"
        key, inc_key = self.keys.slot(self.slot), self.keys.incarnation(self.slot)
        mine = self.record.incarnation
        for _ in range(5):
            session.check()
            state = read_committed(self.client, self.keys)
            listed = state.view.incarnation(self.slot) if state.view else None
            if listed != mine and (listed is not None or self.record.state is SlotState.READY):
                epoch = state.view.epoch if state.view else 0
                raise Excluded(f"slot {self.slot}: view {epoch} does not list incarnation {mine}")
            counter = self.client.get(inc_key)
            try:
                current = parse_counter(counter.value, inc_key) if counter else None
            except MalformedRecord as exc:  # garbage: nothing proves the slot is still ours
                raise Excluded(f"slot {self.slot}: {exc}") from None
            if current != mine:
                raise Excluded(f"slot {self.slot}: a newer incarnation than {mine} registered")
            record = SlotRecord(**{**asdict(self.record), "lease_id": session.lease_id})
            res = self.client.txn(
                [
                    cmp_create(key, 0),
                    cmp_mod(inc_key, counter.mod_revision),
                    cmp_mod(self.keys.view, state.view_revision),
                ],
                [op_put(key, record.to_json(), session.lease_id)],
            )
            if res.succeeded:
                self.session, self.record = session, record
                log.info(
                    "slot %d: incarnation %d re-attached (lease %x)",
                    self.slot,
                    mine,
                    session.lease_id,
                )
                return record
        raise Excluded(f"slot {self.slot}: could not re-attach incarnation {mine}; giving up")


def revoke_slot(client: EtcdClient, keys: Keys, slot: int, incarnation: int | None = None) -> bool:
    """The supervisors' fast path: revoke the lease holding ``slot`` now.

    With ``incarnation``, only that incarnation's lease is revoked (a successor that already
    registered is left alone), and a malformed record counts as absent: nothing shows that
    it is that incarnation's. Without, whatever lease holds the key is revoked. Returns
    whether a lease was revoked.
    """
    kv = client.get(keys.slot(slot))
    if kv is None:
        return False
    if incarnation is not None:
        try:
            if SlotRecord.from_kv(kv, keys).incarnation != incarnation:
                return False
        except MalformedRecord as exc:
            MALFORMED.warn(log, kv.key, kv.mod_revision, str(exc))
            return False
    if not kv.lease:
        return False
    return client.lease_revoke(kv.lease)
