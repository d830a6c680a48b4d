"""The front-end's state: the request log, the committed view, and where each request runs.

Admission: a request runs at once on the least loaded live slot whose KV has room for its
whole context (prompt + max_tokens, as the rank reserves it); otherwise it waits in the log's
queue, oldest first, and runs when a slot has room. The queue holds at most ``max_queue``
requests: :meth:`Frontend.admit` refuses one more, and the client is told to retry (429).

When a committed view drops a slot (or admits a new incarnation of it), that slot's in-flight
requests are re-queued on survivors with their prompt and the tokens already emitted; under
greedy decoding (and seeded sampling, whose draws depend only on the request and the token
index) the continuation is the same. A request that was on ``quarantine_after`` ranks that
failed is failed instead: it may be what brings them down. A client that goes away aborts its
request: the rank is told at once and frees its KV.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

from eep.config import RuntimeConfig
from eep.membership.view import View
from eep.protocol import (
    Abort,
    Migrated,
    MigrateOut,
    MigrateReady,
    Refused,
    Release,
    Submit,
    Tokens,
)

from . import assign
from .links import RankLinks
from .request_log import Record, RequestLog, RequestState
from .tokenizer import ByteTokenizer, Tokenizer

log = logging.getLogger("eep.frontend")

# why a request was refused at the door (HTTP 4xx), and why one in the log was ended early
REJECT_REASONS = (
    "invalid",  # a malformed body or a value out of range
    "unsupported",  # an OpenAI field whose non-default value EEP does not honour
    "context_length",  # prompt + max_tokens over the context limit
    "unknown_model",
    "queue_full",
    "too_large",  # a body over the size limit
    "not_found",  # no such route, or a method it does not take
)
ABORT_REASONS = ("client_disconnect", "quarantined", "refused")
_RATE_WINDOW_S = 10.0  # completions over this window estimate when the queue drains


def context_limit(cfg: RuntimeConfig, max_positions: int | None) -> int:
    """Prompt + max_tokens of one request, at most: ``max_model_len`` when set, else what one
    rank's KV holds, or the model's ``max_position_embeddings`` where that is lower."""
    if cfg.max_model_len:
        return cfg.max_model_len
    if max_positions:
        return min(cfg.rank_kv_tokens, max_positions)
    return cfg.rank_kv_tokens


class Frontend:
    def __init__(
        self,
        cfg: RuntimeConfig,
        vocab_size: int,
        max_positions: int | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        """``tokenizer``: the model's (:func:`.tokenizer.load_tokenizer`); None: bytes."""
        self.cfg = cfg
        self.log = RequestLog()
        self.tokenizer = tokenizer or ByteTokenizer(vocab_size)
        self.vocab_size = vocab_size
        self.max_context = context_limit(cfg, max_positions)
        self.slot_blocks = cfg.rank_kv_tokens // cfg.block_size  # KV blocks a rank lends
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
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.aborted = dict.fromkeys(ABORT_REASONS, 0)
        self._completions: deque[float] = deque()  # monotonic times, the last window's

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
            rec.failed_on.append((rec.slot, rec.incarnation))
            if len(rec.failed_on) >= self.cfg.quarantine_after:
                self._quarantine(rec, view.epoch)
                continue
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

    def _quarantine(self, rec: Record, epoch: int) -> None:
        ranks = ", ".join(f"slot {s} incarnation {i}" for s, i in rec.failed_on)
        reason = (
            f"request {rec.request_id} failed on {len(rec.failed_on)} ranks that died while "
            f"running it ({ranks}); not retried, since it may be what brought them down"
        )
        log.warning("epoch %d: quarantining %s: %s", epoch, rec.request_id, reason)
        self.log.fail(rec, reason, code="quarantined")
        self.aborted["quarantined"] += 1

    def on_link_up(self, slot: int) -> None:
        self.dispatch_queued()
        self.rebalance()

    def on_tokens(self, slot: int, incarnation: int, msg: Tokens) -> None:
        excluded = self.view is None or self.view.incarnation(slot) != incarnation
        ended = 0
        for request_id, index, token, finish in msg.events:
            ok = self.log.accept(request_id, index, token, finish, (slot, incarnation))
            self.stale_accepted += ok and excluded
            self.tokens_from[slot] = self.tokens_from.get(slot, 0) + ok
            if not ok:
                continue
            rec = self.log.records[request_id]
            ended += rec.state is RequestState.FINISHED
            if finish is None and rec.stopped_by_text:
                # a stop string ended it here: the rank, which knows no text, drops it
                self.links.send(slot, Abort(request_id))
        if ended:
            now = time.monotonic()
            self._completions.extend([now] * ended)
            while self._completions[0] < now - _RATE_WINDOW_S:
                self._completions.popleft()
            self.dispatch_queued()  # their KV is free: room for what waits

    # --- admission and placement -----------------------------------------------------------

    def admit(self, rec: Record) -> bool:
        """Take ``rec`` into the log: sent to a slot with room now, or queued behind the
        requests already waiting. False, and nothing kept, when the queue is full."""
        queued = self.log.queued()
        if not queued:
            slot = self._slot_for(rec, self.live_slots())
            if slot is not None:
                self.log.add(rec)
                self.send_to(rec, slot)
                return True
        if len(queued) >= self.cfg.max_queue:
            return False
        self.log.add(rec)
        return True

    def _slot_for(self, rec: Record, live: list[int]) -> int | None:
        return assign.pick_slot(
            live,
            self.log.in_flight(),
            rec.context,
            self.slot_blocks,
            self.cfg.block_size,
            exclude=rec.refused_by,
        )

    def dispatch_queued(self) -> None:
        """Send waiting requests, oldest first, while a slot has room for the oldest."""
        live = self.live_slots()
        if not live:
            return
        for rec in self.log.queued():
            if rec.state is not RequestState.QUEUED:
                continue
            if rec.refused_by and set(live) <= rec.refused_by:
                self._refused_everywhere(rec)
                continue
            slot = self._slot_for(rec, live)
            if slot is None:
                return  # first come, first served: nothing overtakes the oldest
            self.send_to(rec, slot)

    def send_to(self, rec: Record, slot: int, kv=None) -> None:
        msg = Submit(rec.request_id, rec.prompt, list(rec.emitted), rec.params, kv)
        self.links.send(slot, msg)
        rec.slot, rec.incarnation = slot, self.links.incarnation(slot)
        rec.state = RequestState.RUNNING

    def abort(self, rec: Record, reason: str = "client_disconnect") -> None:
        """End ``rec`` before it finished (its client went away): its rank drops it and frees
        its KV at its next step; a move in progress releases the lent blocks when the lender
        answers (:meth:`on_migrate_ready`, :meth:`on_migrated`)."""
        if rec.state is RequestState.FINISHED:
            return
        if rec.state is RequestState.RUNNING and rec.slot is not None:
            self.links.send(rec.slot, Abort(rec.request_id))
        self.log.abort(rec)
        self.aborted[reason] += 1
        log.info("aborted %s (%s) after %d tokens", rec.request_id, reason, len(rec.emitted))
        self.dispatch_queued()

    def finish_response(self, rec: Record) -> None:
        """The client has its answer, or is gone: forget the record (aborting it first if it
        still runs somewhere)."""
        self.abort(rec)
        self.log.drop(rec)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: how long the queue takes to drain at the
        last window's completion rate (1 to 30; 5 while nothing completes)."""
        now = time.monotonic()
        while self._completions and self._completions[0] < now - _RATE_WINDOW_S:
            self._completions.popleft()
        rate = len(self._completions) / _RATE_WINDOW_S
        if rate == 0:
            return 5
        return max(1, min(30, math.ceil(len(self.log.queued()) / rate)))

    # --- moves and refusals ----------------------------------------------------------------

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
        """The old owner stopped the request and lends its KV: give it to the target. Lent
        blocks that no one will read (the request ended or moved meanwhile, its outputs
        disagree, the target is gone) are released at once."""
        rec = self.log.records.get(msg.id)
        if rec is None or rec.state is RequestState.FINISHED or rec.slot != sender:
            log.info("migration of %s: finished or re-queued meanwhile; nothing to move", msg.id)
            if msg.kv is not None:
                self.links.send(sender, Release(msg.id))
            return
        kv, target_live = msg.kv, msg.to in self.live_slots()
        if kv is not None and list(msg.outputs) != rec.emitted:
            log.warning(
                "migration of %s: rank outputs differ from the log; recomputing KV", rec.request_id
            )
            kv = None
        if not target_live:
            kv = None
        if kv is None and msg.kv is not None:
            self.links.send(sender, Release(msg.id))
        rec.migrating = False
        if not target_live:
            rec.slot, rec.state = None, RequestState.QUEUED
            self.dispatch_queued()
            return
        if kv is None:
            log.info(
                "migration of %s: no KV computed yet; slot %d starts it afresh",
                rec.request_id,
                msg.to,
            )
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

    def on_refused(self, slot: int, msg: Refused) -> None:
        """A rank will not run a request: it goes back in the queue for another slot, and
        fails, with the rank's reason, once every live slot has refused it."""
        rec = self.log.records.get(msg.id)
        if rec is None or rec.state is RequestState.FINISHED or rec.slot != slot:
            return
        log.warning("slot %d refused %s: %s", slot, msg.id, msg.reason)
        rec.refused_by.add(slot)
        rec.slot, rec.state, rec.migrating = None, RequestState.QUEUED, False
        rec.refusal = msg.reason  # what the client hears, should every slot refuse
        self.dispatch_queued()

    def _refused_everywhere(self, rec: Record) -> None:
        slots = ", ".join(str(s) for s in sorted(rec.refused_by))
        reason = f"every live rank refused the request (slots {slots}): {rec.refusal}"
        self.log.fail(rec, reason, code="refused")
        self.aborted["refused"] += 1

    # --- state for tooling -----------------------------------------------------------------

    def slots_state(self) -> dict:
        """Per slot: requests in flight on it (and how many of those already streamed a
        token), re-queued off it, migrated onto it and tokens served by it since start. What
        fault tooling reads to inject a fault only into live load, and to prove afterwards
        that it landed. At the top: the records the log holds (requests not yet answered)
        and how many of them wait in the queue."""
        slots: dict[int, dict] = {
            s: {"in_flight": 0, "emitting": 0, "requeued_from": 0, "migrated_to": 0}
            for s in range(self.cfg.num_slots)
        }
        queued = 0
        for rec in self.log.in_flight():
            queued += rec.state is RequestState.QUEUED
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
            "records": len(self.log.records),
            "queued": queued,
            "max_context": self.max_context,
            "slots": {str(s): v for s, v in slots.items()},
        }
