"""KV migration on a rank: lending a request's KV blocks to the slot it moves to, and taking a
request over with its KV.

The front-end moves in-flight requests onto a slot that (re)joined (see
``eep.frontend.assign``). The old owner stops the request and *lends* its blocks
(:meth:`KvMigration.migrate_out`); the new owner reserves blocks, reads the lent ones through
the transfer engine and verifies their checksums (:meth:`KvMigration.take_over`); the front-end
then tells the lender to :meth:`release` them. A read that fails is recomputed (prefill), so a
migration never loses a request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from eep.engine.engine import Engine
from eep.engine.kv_cache import BlockTable, KVCacheFull
from eep.engine.sequence import Sequence
from eep.events import EventLog
from eep.protocol import KvHandoff, Migrated, MigrateReady, ToFrontend
from eep.transfer.arena import Arena
from eep.transfer.errors import TransferError
from eep.transfer.kv import block_checksums, pull_kv_blocks
from eep.transfer.manifest import ManifestStore

log = logging.getLogger("eep.rank.migration")


class KvMigration:
    def __init__(
        self,
        slot: int,
        engine: Engine,
        kv_arena: Arena,
        transport,
        manifests: ManifestStore,
        send: Callable[[ToFrontend], None],
        events: EventLog,
    ):
        self.slot, self.engine, self.kv_arena = slot, engine, kv_arena
        self.transport, self.manifests, self.send, self.events = transport, manifests, send, events
        self.lent: dict[str, BlockTable] = {}  # request id -> KV blocks lent to a migration

    def migrate_out(self, request_id: str, to: int) -> None:
        """Hand a request to slot ``to``: stop running it here and lend its KV blocks until
        the receiver has read them (the front-end says ``Release``)."""
        seq = self.engine.scheduler.detach(request_id)
        kv, outputs = None, []
        if seq is not None and seq.num_computed > 0:
            blocks = list(seq.table.blocks[: self.engine.kv.blocks_for(seq.num_computed)])
            kv = KvHandoff(
                holder=str(self.slot),
                blocks=blocks,
                checksums=list(block_checksums(self.kv_arena, blocks)),
                num_computed=seq.num_computed,
            )
            outputs = list(seq.outputs)
            self.lent[request_id] = seq.table
        elif seq is not None:
            self.engine.kv.release(seq.table)
        self.send(MigrateReady(request_id, to, kv, outputs))

    def release(self, request_id: str) -> None:
        table = self.lent.pop(request_id, None)
        if table is not None:
            self.engine.kv.release(table)

    def release_all(self) -> int:
        """Free every lent block (the front-end that would have said ``Release`` is gone);
        returns how many requests' blocks were lent."""
        lent = list(self.lent)
        for request_id in lent:
            self.release(request_id)
        return len(lent)

    def take_over(self, seq: Sequence, kv: KvHandoff) -> None:
        """Take over a request with its KV: reserve blocks, read the holder's blocks into
        them (verified); if that fails, recompute them (prefill) instead."""
        src = list(kv.blocks)
        try:
            self.engine.kv.reserve(seq.table, seq.max_len)
        except KVCacheFull:  # no room now: queue it and recompute its KV when it fits
            self.engine.add(seq)
            self.send(Migrated(seq.request_id, False))
            return
        started = time.monotonic()
        try:
            peer = self.manifests.get(kv.holder).peer
            pull_kv_blocks(
                self.transport,
                self.kv_arena,
                seq.table.blocks[: len(src)],
                peer,
                "kv",
                src,
                list(kv.checksums),
                dst_holder=str(self.slot),
            )
            seq.num_computed, ok = kv.num_computed, True
        except (TransferError, OSError, ValueError) as exc:
            log.warning(
                "slot %d: KV of %s not migrated (%s); recomputing it",
                self.slot,
                seq.request_id,
                exc,
            )
            seq.num_computed, ok = 0, False
        self.engine.scheduler.adopt(seq)
        self.events.emit(
            "kv_migrated",
            slot=self.slot,
            id=seq.request_id,
            ok=ok,
            blocks=len(src),
            bytes=len(src) * self.kv_arena.block_nbytes,
            seconds=time.monotonic() - started,
        )
        self.send(Migrated(seq.request_id, ok))
