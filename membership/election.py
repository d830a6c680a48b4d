"""Leader election through one lease-bound key.

The first campaigner to create ``coordinator`` (compare ``create_revision == 0``) leads for as
long as its session lives. The key's ``create_revision`` is the leader's fencing token: every
write the leader makes compares it, so a deposed leader's late writes fail.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from .errors import EtcdUnavailable, WatchBroken, WatchCompacted
from .etcd import EtcdClient, cmp_create, op_delete, op_get, op_put
from .session import Session

log = logging.getLogger(__name__)


class Election:
    def __init__(self, client: EtcdClient, key: str, session: Session, identity: str = ""):
        self.client, self.key, self.session = client, key, session
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self.leader_revision = 0  # create_revision of our key while we lead
        self.last_failure = 0.0  # monotonic time etcd last failed the campaign (0: never)

    def fence(self) -> list[dict]:
        """The compare that holds only while we are still the leader."""
        return [cmp_create(self.key, self.leader_revision)]

    def campaign(self, stop: threading.Event) -> bool:
        """Block until we lead (True) or ``stop``/session loss ends the campaign (False)."""
        value = json.dumps({"identity": self.identity, "lease": self.session.lease_id})
        while not stop.is_set() and not self.session.done.is_set():
            try:
                res = self.client.txn(
                    [cmp_create(self.key, 0)],
                    [op_put(self.key, value, self.session.lease_id)],
                    [op_get(self.key)],
                )
                if res.succeeded:
                    self.leader_revision = res.revision
                    log.info("%s: elected leader (revision %d)", self.identity, res.revision)
                    return True
                holder = res.responses[0][0] if res.responses and res.responses[0] else None
                if holder is not None and holder.lease == self.session.lease_id:
                    self.leader_revision = holder.create_revision  # our own earlier write
                    return True
                if holder is not None:
                    self._wait_deleted(holder.mod_revision, stop)
            except (EtcdUnavailable, WatchBroken, WatchCompacted) as exc:
                log.info("%s: campaign interrupted (%s); retrying", self.identity, exc)
                if not isinstance(exc, WatchCompacted):
                    self.last_failure = time.monotonic()
                stop.wait(0.2)
        return False

    def _wait_deleted(self, mod_revision: int, stop: threading.Event) -> None:
        stream = self.client.watch(self.key, mod_revision + 1)
        try:
            while not stop.is_set() and not self.session.done.is_set():
                batch = stream.get(0.25)
                if batch and any(e.kind == "delete" for e in batch.events):
                    return
        finally:
            stream.close()

    def resign(self) -> None:
        if self.leader_revision:
            try:
                self.client.txn(self.fence(), [op_delete(self.key)])
            except EtcdUnavailable as exc:
                log.warning("%s: resign failed (%s); the lease will expire", self.identity, exc)
            self.leader_revision = 0
