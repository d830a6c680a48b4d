"""The full-restart baseline's start-up barrier (see :class:`GroupBarrier`)."""

from __future__ import annotations

import json
import time

from eep.membership.errors import MembershipError, decode_object
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys


class GroupNotUp(MembershipError):
    """A baseline slot's torchrun group did not come up together in time."""


class GroupBarrier:
    """The baseline's start-up barrier: a slot turns ``ready`` only once every slot of its
    torchrun group (same restart round) has a ready worker, as a fixed-membership job starts
    serving only when all of its ranks are up. Without it the coordinator would admit the
    first restarted slot alone, a view in which the other slots' experts have no replica.

    Each slot puts ``baseline/<slot>`` (bound to its lease, so a dead slot's entry goes with
    it) and polls the prefix."""

    POLL_S = 0.1

    def __init__(self, client: EtcdClient, keys: Keys, slot: int, size: int, round_: int):
        self.client = client
        self.slot, self.size, self.round = slot, size, round_
        self.prefix = f"{keys.prefix}baseline/"
        self.joined_lease = 0
        self.next_poll = 0.0

    def passed(self, lease_id: int) -> bool:
        if self.size <= 1:
            return True
        if self.joined_lease != lease_id:
            value = json.dumps({"slot": self.slot, "round": self.round})
            self.client.put(f"{self.prefix}{self.slot}", value, lease=lease_id)
            self.joined_lease = lease_id
        if time.monotonic() < self.next_poll:
            return False
        self.next_poll = time.monotonic() + self.POLL_S
        kvs, _ = self.client.get_prefix(self.prefix)
        rounds = [_round(kv.value) for kv in kvs]
        return rounds.count(self.round) >= self.size


def _round(raw: bytes) -> int | None:
    """The restart round in a ``baseline/<slot>`` entry; None for anything malformed."""
    try:
        return decode_object(raw, "baseline entry", MembershipError).get("round")
    except MembershipError:
        return None
