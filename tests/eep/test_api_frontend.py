"""The front-end's admission bookkeeping (eep.frontend.core.Frontend) driven message by
message, with the rank links replaced by a recorder: what runs where, what waits, what is
refused, aborted or quarantined, and which messages the ranks are sent."""

from __future__ import annotations

import asyncio

from eep.config import RuntimeConfig
from eep.frontend.core import Frontend, context_limit
from eep.frontend.request_log import Record, RequestState
from eep.membership.view import View
from eep.protocol import (
    Abort,
    KvHandoff,
    MigrateReady,
    Refused,
    Release,
    SamplingParams,
    Submit,
    Tokens,
)


class Links:
    """Every slot's link up at the incarnation given; what is sent, recorded."""

    def __init__(self, incarnations: dict[int, int]):
        self.incarnations = dict(incarnations)
        self.sent: list[tuple[int, object]] = []

    def incarnation(self, slot: int) -> int | None:
        return self.incarnations.get(slot)

    def send(self, slot: int, msg) -> bool:
        self.sent.append((slot, msg))
        return slot in self.incarnations


def _front(**settings) -> Frontend:
    # 4 KV blocks of 16 tokens per rank: a request of 64 tokens fills one
    cfg = RuntimeConfig("c", "/m", 2, 8, kv_blocks=4, block_size=16, **settings)
    front = Frontend(cfg, vocab_size=512, max_positions=1000)
    front.links = Links({0: 1, 1: 1})
    front.on_view(View(1, (0, 1), ((0, 1), (1, 1))))
    return front


def _rec(i: int, tokens: int = 64) -> Record:
    return Record(f"r{i}", [1] * 4, SamplingParams(max_tokens=tokens - 4))


def _sent(front: Frontend, kind: type) -> list[tuple[int, str]]:
    return [(slot, msg.id) for slot, msg in front.links.sent if isinstance(msg, kind)]


def test_the_context_limit_is_max_model_len_or_the_smaller_of_kv_and_positions():
    cfg = RuntimeConfig("c", "/m", 2, 8, kv_blocks=4, block_size=16)
    assert context_limit(cfg, None) == 64 and context_limit(cfg, 40) == 40
    assert context_limit(cfg, 1000) == 64
    assert context_limit(RuntimeConfig("c", "/m", 2, 8, max_model_len=100), 50) == 100


def test_what_fits_runs_what_fits_later_waits_and_a_full_queue_refuses():
    async def main():
        front = _front(max_queue=1)
        recs = [_rec(i) for i in range(4)]
        assert all(front.admit(r) for r in recs[:3])
        assert front.admit(recs[3]) is False and "r3" not in front.log.records
        assert _sent(front, Submit) == [(0, "r0"), (1, "r1")]
        assert recs[2].state is RequestState.QUEUED
        assert front.slots_state()["queued"] == 1 and front.slots_state()["records"] == 3
        assert front.retry_after() == 5  # nothing completed yet: a default
        # r1 finishes on slot 1: its KV is free, so the oldest waiting request runs there
        front.on_tokens(1, 1, Tokens(1, [("r1", 0, 9, "length")]))
        assert _sent(front, Submit)[-1] == (1, "r2") and recs[2].state is RequestState.RUNNING
        assert 1 <= front.retry_after() <= 30

    asyncio.run(main())


def test_an_aborted_request_is_dropped_on_its_rank_and_a_waiting_one_leaves_the_queue():
    async def main():
        front = _front()
        running, waiting = _rec(0), _rec(1)
        other = _rec(2)
        assert front.admit(running) and front.admit(other) and front.admit(waiting)
        front.finish_response(waiting)  # its client went away while it waited
        assert _sent(front, Abort) == [] and waiting.request_id not in front.log.records
        front.finish_response(running)
        assert _sent(front, Abort) == [(0, "r0")] and running.finish_reason == "abort"
        assert front.aborted["client_disconnect"] == 2 and front.slots_state()["records"] == 1
        # the rank's step after the abort: late, dropped, no error
        front.on_tokens(0, 1, Tokens(0, [("r0", 0, 5, None)]))
        assert front.log.late == 1 and front.log.tokens == 0

    asyncio.run(main())


def test_a_request_on_quarantine_after_failed_ranks_fails_instead_of_running_again():
    async def main():
        front = _front(quarantine_after=2)
        rec = _rec(0, tokens=16)
        assert front.admit(rec) and rec.slot == 0
        front.links.incarnations.pop(0)
        front.on_view(View(2, (1,), ((1, 1),)))  # slot 0 died: re-queued on slot 1
        assert rec.slot == 1 and rec.failed_on == [(0, 1)] and front.requeued == 1
        front.links.incarnations[1] = 2
        front.on_view(View(3, (1,), ((1, 2),)))  # slot 1 died too (and restarted)
        assert rec.state is RequestState.FINISHED and rec.error_code == "quarantined"
        assert "failed on 2 ranks" in rec.error and "not retried" in rec.error
        assert "slot 0 incarnation 1, slot 1 incarnation 1" in rec.error
        assert front.aborted["quarantined"] == 1 and front.requeued == 1
        assert rec.updates.get_nowait() == (None, "", "error")
        assert _sent(front, Submit) == [(0, "r0"), (1, "r0")]  # not sent a third time

    asyncio.run(main())


def test_a_refused_request_tries_another_slot_and_fails_once_every_slot_refused():
    async def main():
        front = _front()
        rec = _rec(0, tokens=16)
        assert front.admit(rec) and rec.slot == 0
        front.on_refused(1, Refused("r0", "not mine"))  # not its slot: ignored
        assert rec.slot == 0 and rec.refused_by == set()
        front.on_refused(0, Refused("r0", "KV too small"))
        assert rec.slot == 1 and rec.state is RequestState.RUNNING
        front.on_refused(1, Refused("r0", "KV too small"))
        assert rec.state is RequestState.FINISHED and rec.error_code == "refused"
        assert rec.error == "every live rank refused the request (slots 0, 1): KV too small"
        assert front.aborted["refused"] == 1

    asyncio.run(main())


def test_a_request_refused_once_then_served_elsewhere_is_not_an_error():
    async def main():
        front = _front()
        rec = _rec(0, tokens=16)
        assert front.admit(rec) and rec.slot == 0
        front.on_refused(0, Refused("r0", "KV too small"))
        assert rec.slot == 1
        front.on_tokens(1, 1, Tokens(1, [("r0", 0, 5, "length")]))
        assert rec.state is RequestState.FINISHED and rec.finish_reason == "length"
        assert rec.error is None and rec.error_code is None  # what the API answers from

    asyncio.run(main())


def test_lent_kv_that_no_one_will_read_is_released():
    async def main():
        front = _front()
        rec = _rec(0, tokens=16)
        assert front.admit(rec)
        rec.migrating = True
        front.finish_response(rec)  # the client left while its rank was handing it over
        kv = KvHandoff("0", [3], ["c"], 5)
        front.on_migrate_ready(0, MigrateReady("r0", 1, kv, []))
        assert _sent(front, Release) == [(0, "r0")]
        # a request whose rank's outputs disagree with the log is recomputed: release too
        other = _rec(1, tokens=16)
        assert front.admit(other) and other.slot == 0
        front.on_migrate_ready(0, MigrateReady("r1", 1, kv, [7]))
        assert _sent(front, Release)[-1] == (0, "r1")
        assert _sent(front, Submit)[-1] == (1, "r1") and other.slot == 1

    asyncio.run(main())
