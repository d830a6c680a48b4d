"""The request log: every accepted request's prompt and emitted tokens, and its stream.

A token is accepted only at the next index of its request (``index == len(emitted)``): a
token a dead rank sent twice, or a re-queued request's rank resending, is dropped and counted,
so no stream ever repeats or skips a token.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from eep.protocol import SamplingParams


class RequestState(enum.Enum):
    QUEUED = "queued"  # accepted, no live slot to run it yet
    RUNNING = "running"
    FINISHED = "finished"


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
    created: float = field(default_factory=time.time)
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)


class RequestLog:
    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.duplicates = 0
        self.stale = 0  # tokens from a rank the request had been taken from
        self.gaps = 0
        self.tokens = 0
        self.completed = 0

    def add(self, record: Record) -> None:
        self.records[record.request_id] = record

    def in_flight(self, slot: int | None = None) -> list[Record]:
        return [
            r
            for r in self.records.values()
            if r.state is not RequestState.FINISHED and (slot is None or r.slot == slot)
        ]

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
        that a view excluded may still finish a step before it fences)."""
        rec = self.records.get(request_id)
        if rec is None or rec.state is RequestState.FINISHED:
            self.duplicates += 1
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
        if finish is not None:
            rec.state, rec.finish_reason = RequestState.FINISHED, finish
            self.completed += 1
        rec.updates.put_nowait((token, finish))
        return True
