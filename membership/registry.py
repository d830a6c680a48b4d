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
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import EtcdRequestError, LeaseLost, MembershipError, SlotTaken
from .etcd import EtcdClient, KeyValue, cmp_create, cmp_lease, cmp_mod, op_get, op_put
from .keys import Keys
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
    # data-plane suspicion: "I need a view newer than this epoch" (0: nothing asked)
    resync_epoch: int = 0

    def to_json(self) -> str:
        obj = asdict(self)
        obj["state"] = self.state.value
        return json.dumps(obj, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str, where: str = "slot record") -> SlotRecord:
        try:
            obj = json.loads(raw)
            obj["state"] = SlotState(obj["state"])
            return cls(**obj)
        except (ValueError, KeyError, TypeError) as exc:
            raise MembershipError(f"{where} is malformed ({exc}): {raw[:200]!r}") from exc


def read_slots(client: EtcdClient, keys: Keys) -> tuple[dict[int, SlotRecord], int]:
    """Every registered slot (malformed records are logged and skipped) and the read's revision."""
    kvs, revision = client.get_prefix(keys.slots)
    records = {}
    for kv in kvs:
        try:
            rec = SlotRecord.from_json(kv.value, where=kv.key)
        except MembershipError as exc:
            log.error("%s; ignoring it", exc)
            continue
        records[rec.slot] = rec
    return records, revision


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
        predecessor's lease expiring), then raise :class:`SlotTaken`.
        """
        deadline = time.monotonic() + wait_s
        key, inc_key = self.keys.slot(self.slot), self.keys.incarnation(self.slot)
        while True:
            self.session.check()
            inc_kv = self.client.get(inc_key)
            incarnation = (int(inc_kv.value) if inc_kv else 0) + 1
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
            if time.monotonic() >= deadline:
                raise SlotTaken(self._taken_message(holder))
            time.sleep(0.05)

    def _taken_message(self, holder: KeyValue) -> str:
        try:
            rec = SlotRecord.from_json(holder.value)
            who = f"pid {rec.pid} on {rec.host}, incarnation {rec.incarnation}"
        except MembershipError:
            who = "an unreadable record"
        return (
            f"slot {self.slot} is held by {who}; stop that process or wait for its lease to "
            f"expire (`eep revoke --slot {self.slot}` ends it now)."
        )

    def _record(self, incarnation: int, state: SlotState) -> SlotRecord:
        return SlotRecord(
            slot=self.slot,
            incarnation=incarnation,
            pid=os.getpid(),
            host=socket.gethostname(),
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
    ) -> SlotRecord:
        """Rewrite the record (state, endpoints, a resync request); raises
        :class:`LeaseLost` once fenced."""
        assert self.record is not None, "register() first"
        self.session.check()
        if endpoints is not None:
            self.endpoints = dict(endpoints)
        record = SlotRecord(
            **{
                **asdict(self.record),
                "state": state or self.record.state,
                "endpoints": self.endpoints,
                "resync_epoch": self.record.resync_epoch if resync_epoch is None else resync_epoch,
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


def revoke_slot(client: EtcdClient, keys: Keys, slot: int, incarnation: int | None = None) -> bool:
    """The supervisors' fast path: revoke the lease holding ``slot`` now.

    With ``incarnation``, only that incarnation's lease is revoked (a successor that already
    registered is left alone). Returns whether a lease was revoked.
    """
    kv = client.get(keys.slot(slot))
    if kv is None:
        return False
    if incarnation is not None:
        try:
            if SlotRecord.from_json(kv.value).incarnation != incarnation:
                return False
        except MembershipError:
            pass
    if not kv.lease:
        return False
    return client.lease_revoke(kv.lease)
