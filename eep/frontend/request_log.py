"""The request log: every request the front-end holds, its prompt and emitted tokens, and its
stream.

A token is accepted only at the next index of its request (``index == len(emitted)``): a
token a dead rank sent twice, or a re-queued request's rank resending, is dropped and counted,
so no stream ever repeats or skips a token.

Each accepted token goes through the record's :class:`~.detokenize.TextStream`, and what it
releases goes to the client with it (:class:`Update`): the streamed pieces and the whole
answer are the same text. A token that completes a stop string finishes the request here, with
``stop``; the caller tells the rank to drop it.

A record lives here from its admission until its HTTP response is done (:meth:`drop`), so the
log's memory is bounded by the requests being answered; the counters outlive the records. A
token for a request no longer here (it finished, failed or was aborted, and its response was
sent) is a ``late`` token: counted and dropped, never an error.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from eep.protocol import SamplingParams

from .detokenize import TextStream


class RequestState(enum.Enum):
    QUEUED = "queued"  # admitted, waiting at the front-end for a slot with room
    RUNNING = "running"  # sent to a rank
    FINISHED = "finished"


class Update(NamedTuple):
    """What a record's client is sent next: an accepted ``token`` and the ``text`` it released
    (token None: the request failed or was aborted), and the finish reason if it ended."""

    token: int | None
    text: str
    finish: str | None


@dataclass
class Record:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    emitted: list[int] = field(default_factory=list)
    slot: int | None = None
    incarnation: int | None = None  # of the slot's process it was given to
    state: RequestState = RequestState.QUEUED
    finish_reason: str | None = None
    requeues: int = 0
    migrating: bool = False  # asked its rank to hand it (and its KV) to another slot
    error: str | None = None  # why it failed (finish_reason "error"), for the client
    error_code: str | None = None  # "quarantined" or "refused"
    # (slot, incarnation) of every rank that failed while holding it (a view stranded it)
    failed_on: list[tuple[int, int]] = field(default_factory=list)
    refused_by: set[int] = field(default_factory=set)  # slots that refused to run it
    refusal: str | None = None  # the last refusal's reason, should every slot refuse
    created: float = field(default_factory=time.time)
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # of Update
    # its tokens as text, cut at a stop string (None: no text is made, e.g. in unit tests)
    text: TextStream | None = None

    @property
    def stopped_by_text(self) -> bool:
        """A stop string ended it at the front-end (the rank did not finish it)."""
        return self.text is not None and self.text.stopped

    @property
    def context(self) -> int:
        """Tokens of KV the request takes on a rank: its prompt and every token it may emit
        (what the rank's scheduler reserves before running it)."""
        return len(self.prompt) + self.params.max_tokens


class RequestLog:
    def __init__(self) -> None:
        self.records: dict[str, Record] = {}  # insertion order: the order of admission
        self.accepted = 0
        self.duplicates = 0
        self.stale = 0  # tokens from a rank the request had been taken from
        self.late = 0  # tokens for a request that had already ended
        self.gaps = 0
        self.tokens = 0
        self.completed = 0
        self.failed = 0
        self.aborted = 0

    def add(self, record: Record) -> None:
        self.records[record.request_id] = record
        self.accepted += 1

    def drop(self, record: Record) -> None:
        """Forget a finished record (its response is done); its counters stay."""
        assert record.state is RequestState.FINISHED, record.request_id
        self.records.pop(record.request_id, None)

    def in_flight(self, slot: int | None = None) -> list[Record]:
        return [
            r
            for r in self.records.values()
            if r.state is not RequestState.FINISHED and (slot is None or r.slot == slot)
        ]

    def queued(self) -> list[Record]:
        """Records waiting at the front-end, oldest first."""
        return [r for r in self.records.values() if r.state is RequestState.QUEUED]

    def accept(
        self,
        request_id: str,
        index: int,
        token: int,
        finish: str | None,
        sender: tuple[int, int] | None = None,
    ) -> bool:
        """Record one token; False (and counted) when it is a duplicate or out of order, or
        comes from a ``(slot, incarnation)`` the request is no longer assigned to (a rank
        that a view excluded may still finish a step before it fences), or the request has
        ended (a rank told to abort may finish the step it is in)."""
        rec = self.records.get(request_id)
        if rec is None or rec.state is RequestState.FINISHED:
            self.late += 1
            return False
        if sender is not None and sender != (rec.slot, rec.incarnation):
            self.stale += 1
            return False
        if index < len(rec.emitted):
            self.duplicates += 1
            return False
        if index > len(rec.emitted):
            self.gaps += 1
            return False
        rec.emitted.append(token)
        self.tokens += 1
        text = ""
        if rec.text is not None:
            text, stopped = rec.text.push(token, finish)
            finish = "stop" if stopped else finish
        if finish is not None:
            rec.state, rec.finish_reason = RequestState.FINISHED, finish
            self.completed += 1
        rec.updates.put_nowait(Update(token, text, finish))
        return True

    def fail(self, rec: Record, reason: str, code: str | None = None) -> None:
        """End ``rec`` with an error the client is told (``finish_reason`` ``"error"``)."""
        if rec.state is RequestState.FINISHED:
            return
        rec.state, rec.finish_reason = RequestState.FINISHED, "error"
        rec.error, rec.error_code = reason, code
        self.failed += 1
        rec.updates.put_nowait(Update(None, "", "error"))

    def abort(self, rec: Record) -> None:
        """End ``rec`` because its client went away (``finish_reason`` ``"abort"``)."""
        if rec.state is RequestState.FINISHED:
            return
        rec.state, rec.finish_reason = RequestState.FINISHED, "abort"
        self.aborted += 1
        rec.updates.put_nowait(Update(None, "", "abort"))
