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
