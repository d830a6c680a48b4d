"""A request inside the engine and the scheduler that batches them."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockTable, KVCache
from .sampling import SamplingParams


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"


@dataclass
class Sequence:
    """``tokens`` = prompt + outputs so far; ``num_computed`` tokens have their KV cached.

    A re-queued request arrives with the outputs it already emitted elsewhere; they are part
    of its context, and new outputs continue their numbering.
    """

    request_id: str
    prompt: list[int]
    outputs: list[int]
    params: SamplingParams
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0
    finished: FinishReason | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs

    @property
    def max_len(self) -> int:
        return len(self.prompt) + self.params.max_tokens


@dataclass(frozen=True, slots=True)
class Scheduled:
    seq: Sequence
    start: int  # first position computed in this step
    count: int  # positions computed in this step
    samples: bool  # this step reaches the end of the known tokens: sample the next one


class Scheduler:
    """Continuous batching under a per-step token budget (chunked prefill).

    Running sequences decode one token each first; the rest of the budget prefills waiting
    ones in arrival order. A sequence is admitted only when its whole KV (prompt + max_tokens)
    fits, so nothing is preempted halfway.
    """

    def __init__(self, kv: KVCache, max_tokens_per_step: int, max_seqs: int = 256):
        self.kv, self.budget, self.max_seqs = kv, max_tokens_per_step, max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for group in (self.running, self.waiting):
            for seq in list(group):
                if seq.request_id == request_id:
                    group.remove(seq)
                    self.kv.release(seq.table)
                    return seq
        return None

    def detach(self, request_id: str) -> Sequence | None:
        """Take a sequence out without freeing its blocks (its KV is being migrated; the
        caller frees them with ``kv.release`` once the receiver has it)."""
        for group in (self.running, self.waiting):
            for seq in list(group):
                if seq.request_id == request_id:
                    group.remove(seq)
                    return seq
        return None

    def adopt(self, seq: Sequence) -> None:
        """Run a sequence whose blocks are reserved and whose first ``num_computed`` positions
        already hold KV (migrated in): it goes straight to decoding."""
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        left, batch = self.budget, []
        for seq in self.running:
            if left == 0:
                break
            batch.append(self._take(seq, left))
            left -= batch[-1].count
        while left > 0 and self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if self.kv.blocks_for(seq.max_len) > self.kv.free_blocks:
                break
            self.kv.reserve(seq.table, seq.max_len)
            self.running.append(self.waiting.popleft())
            batch.append(self._take(seq, left))
            left -= batch[-1].count
        return batch

    @staticmethod
    def _take(seq: Sequence, left: int) -> Scheduled:
        pending = len(seq.tokens) - seq.num_computed
        count = min(pending, left)
        return Scheduled(seq, seq.num_computed, count, samples=count == pending)

    def retire(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq.table)
