"""The front-end's state: the request log, the committed view, and where each request runs.

Requests go to the live slot with the fewest requests in flight. When a committed view drops
a slot (or admits a new incarnation of it), that slot's in-flight requests are re-queued on
survivors with their prompt and the tokens already emitted; under greedy decoding (and seeded
sampling, whose draws depend only on the request and the token index) the continuation is the
same. A request accepted while no slot is live waits in the log: nothing accepted is dropped.
"""

from __future__ import annotations

import logging

from eep.config import RuntimeConfig
from eep.membership.view import View
from eep.protocol import Migrated, MigrateOut, MigrateReady, Release, Submit, Tokens

from . import assign
from .links import RankLinks
from .request_log import Record, RequestLog, RequestState
from .tokenizer import ByteTokenizer

log = logging.getLogger("eep.frontend")


class Frontend:
    def __init__(self, cfg: RuntimeConfig, vocab_size: int):
        self.cfg = cfg
        self.log = RequestLog()
        self.tokenizer = ByteTokenizer(vocab_size)
        self.vocab_size = vocab_size
        self.links = RankLinks(self)
        self.view: View | None = None
        self.requeued = 0
        self.migrated = 0
        # per slot, for fault tooling: requests re-queued off it, and moved onto it with their
        # KV (a rejoined slot takes in-flight load)
        self.requeued_from: dict[int, int] = {}
        self.migrated_to: dict[int, int] = {}
        # tokens accepted from a (slot, incarnation) that the current view excludes: an
        # invariant (it must stay 0), counted so a chaos run can check it
        self.stale_accepted = 0
        self.tokens_from: dict[int, int] = {}  # tokens accepted from each slot
        self.joined: set[int] = set()  # slots that (re)joined and may take load
        self.lenders: dict[str, int] = {}  # request id -> slot lending its KV blocks

    # --- the view and the ranks ------------------------------------------------------------

    def live_slots(self) -> list[int]:
        """Members of the committed view whose link is up, from the incarnation it names."""
        if self.view is None:
            return []
        return [
            s for s in self.view.members if self.links.incarnation(s) == self.view.incarnation(s)
        ]

    def on_view(self, view: View) -> None:
        """Runs on the event loop for every committed view, in epoch order."""
        previous, self.view = self.view, view
        for rec in assign.stranded(view, self.log.in_flight()):
            log.info(
                "epoch %d: re-queueing %s from slot %d after %d tokens",
                view.epoch,
                rec.request_id,
                rec.slot,
                len(rec.emitted),
            )
            self.requeued_from[rec.slot] = self.requeued_from.get(rec.slot, 0) + 1
            rec.slot, rec.state, rec.migrating = None, RequestState.QUEUED, False
            rec.requeues += 1
            self.requeued += 1
        old = dict(previous.incarnations) if previous else {}
        self.joined |= {s for s, inc in view.incarnations if previous and old.get(s) != inc}
        self.dispatch_queued()
        self.rebalance()

    def on_link_up(self, slot: int) -> None:
        self.dispatch_queued()
        self.rebalance()

    def on_tokens(self, slot: int, incarnation: int, msg: Tokens) -> None:
        excluded = self.view is None or self.view.incarnation(slot) != incarnation
        for request_id, index, token, finish in msg.events:
            ok = self.log.accept(request_id, index, token, finish, (slot, incarnation))
            self.stale_accepted += ok and excluded
            self.tokens_from[slot] = self.tokens_from.get(slot, 0) + ok

    # --- placement of requests -------------------------------------------------------------

    def assign(self, rec: Record) -> None:
        slot = assign.least_loaded(self.live_slots(), self.log.in_flight())
        if slot is not None:
            self.send_to(rec, slot)

    def dispatch_queued(self) -> None:
        for rec in self.log.in_flight():
            if rec.state is RequestState.QUEUED:
                self.assign(rec)

    def send_to(self, rec: Record, slot: int, kv=None) -> None:
        msg = Submit(rec.request_id, rec.prompt, list(rec.emitted), rec.params, kv)
        self.links.send(slot, msg)
        rec.slot, rec.incarnation = slot, self.links.incarnation(slot)
        rec.state = RequestState.RUNNING

    def rebalance(self) -> None:
        """Move in-flight requests onto slots that (re)joined, with their KV blocks."""
        live = self.live_slots()
        for target in sorted(self.joined & set(live)):
            self.joined.discard(target)
            for rec, source in assign.rebalance_moves(target, live, self.log.in_flight()):
                rec.migrating = True
                log.info(
                    "rebalance: moving %s from slot %d to slot %d, which joined",
                    rec.request_id,
                    source,
                    target,
                )
                self.links.send(source, MigrateOut(rec.request_id, target))

    def on_migrate_ready(self, sender: int, msg: MigrateReady) -> None:
        """The old owner stopped the request and lends its KV: give it to the target."""
        rec = self.log.records.get(msg.id)
        if rec is None or rec.state is RequestState.FINISHED or rec.slot != sender:
            log.info("migration of %s: finished or re-queued meanwhile; nothing to move", msg.id)
            return
        kv = msg.kv
        if kv is not None and list(msg.outputs) != rec.emitted:
            log.warning(
                "migration of %s: rank outputs differ from the log; recomputing KV", rec.request_id
            )
            kv = None
        rec.migrating = False
        if kv is None:
            log.info(
                "migration of %s: no KV computed yet; slot %d starts it afresh",
                rec.request_id,
                msg.to,
            )
        if msg.to not in self.live_slots():
            rec.slot, rec.state = None, RequestState.QUEUED
            self.assign(rec)
            return
        self.send_to(rec, msg.to, kv)
        if kv is not None:
            self.migrated += 1
            self.migrated_to[msg.to] = self.migrated_to.get(msg.to, 0) + 1
            self.lenders[rec.request_id] = sender

    def on_migrated(self, msg: Migrated) -> None:
        """The receiver has the request: the lender may free the KV blocks it lent."""
        holder = self.lenders.pop(msg.id, None)
        if holder is not None:
            self.links.send(holder, Release(msg.id))

    # --- state for tooling -----------------------------------------------------------------

    def slots_state(self) -> dict:
        """Per slot: requests in flight on it (and how many of those already streamed a
        token), re-queued off it, migrated onto it and tokens served by it since start. What
        fault tooling reads to inject a fault only into live load, and to prove afterwards
        that it landed."""
        slots: dict[int, dict] = {
            s: {"in_flight": 0, "emitting": 0, "requeued_from": 0, "migrated_to": 0}
            for s in range(self.cfg.num_slots)
        }
        for rec in self.log.in_flight():
            if rec.slot in slots and rec.state is RequestState.RUNNING:
                slots[rec.slot]["in_flight"] += 1
                slots[rec.slot]["emitting"] += bool(rec.emitted)
        live = self.live_slots()
        for s, entry in slots.items():
            entry["requeued_from"] = self.requeued_from.get(s, 0)
            entry["migrated_to"] = self.migrated_to.get(s, 0)
            entry["tokens"] = self.tokens_from.get(s, 0)
            entry["live"] = s in live
            entry["incarnation"] = self.view.incarnation(s) if self.view else None
        return {
            "epoch": self.view.epoch if self.view else 0,
            "requeued": self.requeued,
            "migrated": self.migrated,
            "stale_accepted": self.stale_accepted,
            "slots": {str(s): v for s, v in slots.items()},
        }
