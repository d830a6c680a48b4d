"""The front-end's request log: every token once, in order, from the rank that owns it."""

from __future__ import annotations

import asyncio

from eep.engine.sampling import SamplingParams
from eep.frontend.request_log import Record, RequestLog, RequestState


def _log_with_one_request() -> tuple[RequestLog, Record]:
    log = RequestLog()
    rec = Record("r1", [1, 2], SamplingParams(max_tokens=3), slot=2, incarnation=5)
    log.add(rec)
    return log, rec


def test_tokens_are_taken_in_order_and_once():
    async def main():
        log, rec = _log_with_one_request()
        assert log.accept("r1", 0, 7, None, (2, 5))
        assert not log.accept("r1", 0, 7, None, (2, 5))  # a duplicate
        assert not log.accept("r1", 2, 9, None, (2, 5))  # a gap
        assert log.accept("r1", 1, 8, None, (2, 5))
        assert log.accept("r1", 2, 9, "length", (2, 5))
        assert rec.emitted == [7, 8, 9] and rec.state is RequestState.FINISHED
        assert (log.duplicates, log.gaps, log.completed) == (1, 1, 1)
        assert not log.accept("r1", 3, 1, None, (2, 5))  # after the end

    asyncio.run(main())


def test_tokens_from_a_rank_the_request_was_taken_from_are_dropped():
    async def main():
        log, rec = _log_with_one_request()
        assert log.accept("r1", 0, 7, None, (2, 5))
        rec.slot, rec.incarnation = 3, 1  # re-queued on slot 3 after slot 2 left the view
        assert not log.accept("r1", 1, 8, None, (2, 5))
        assert not log.accept("r1", 1, 8, None, (3, 2))  # another incarnation of slot 3
        assert log.accept("r1", 1, 8, None, (3, 1))
        assert log.stale == 2 and rec.emitted == [7, 8]

    asyncio.run(main())


def test_a_dropped_record_leaves_its_counters_and_its_late_tokens_are_counted():
    async def main():
        log, rec = _log_with_one_request()
        assert log.accept("r1", 0, 7, None, (2, 5))
        log.abort(rec)
        assert rec.state is RequestState.FINISHED and rec.finish_reason == "abort"
        assert rec.updates.get_nowait() == (7, "", None)
        assert rec.updates.get_nowait() == (None, "", "abort")
        assert not log.accept("r1", 1, 8, None, (2, 5))  # the rank's step after the abort
        log.drop(rec)
        assert log.records == {} and log.in_flight() == []
        assert not log.accept("r1", 2, 9, "length", (2, 5))  # an id no longer in the log
        assert (log.accepted, log.aborted, log.late, log.tokens) == (1, 1, 2, 1)
        assert (log.duplicates, log.stale, log.gaps, log.completed) == (0, 0, 0, 0)

    asyncio.run(main())


def test_a_failed_request_tells_its_stream_why_once():
    async def main():
        log, rec = _log_with_one_request()
        log.fail(rec, "ranks died", code="quarantined")
        log.fail(rec, "again")  # already ended: no second event
        log.abort(rec)
        assert (rec.error, rec.error_code, rec.finish_reason) == (
            "ranks died",
            "quarantined",
            "error",
        )
        assert rec.updates.get_nowait() == (None, "", "error") and rec.updates.empty()
        assert (log.failed, log.aborted) == (1, 0)

    asyncio.run(main())


def test_the_queue_is_the_waiting_records_oldest_first():
    log = RequestLog()
    recs = [Record(f"r{i}", [1], SamplingParams(max_tokens=4)) for i in range(4)]
    for rec in recs:
        log.add(rec)
    recs[1].state = RequestState.RUNNING
    recs[2].state = RequestState.FINISHED
    assert log.queued() == [recs[0], recs[3]]
    assert recs[0].context == 5
