"""A worker whose front-end link is down fails to send tokens every step (about 50 a second);
eep.rank.link.UnsentLog says so once, then at most every 5 s with a count."""

from __future__ import annotations

import logging

from eep.rank.link import UnsentLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_tokens_a_down_link_cannot_send_are_logged_once_then_every_5_s_with_a_count(caplog):
    clock = Clock()
    unsent = UnsentLog(slot=3, every_s=5.0, clock=clock)
    exc = ConnectionError("front-end not connected")
    with caplog.at_level(logging.WARNING, logger="eep.rank.link"):
        logged = []
        for _ in range(250):  # 5 s of steps at 50 a second, 2 tokens each
            logged.append(unsent.failed(2, exc))
            clock.now += 0.02
        clock.now = 105.0  # 5 s after the first line
        logged.append(unsent.failed(2, exc))
        clock.now += 1
        logged.append(unsent.failed(3, exc))
        unsent.sent()  # the link is back: what was not said yet is said
        assert unsent.failed(1, exc)  # a new streak is logged at once
    assert logged[0] and not any(logged[1:-2]) and logged[-2] and not logged[-1]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "slot 3: could not send 2 tokens (queued for the front-end): front-end not connected",
        "slot 3: 500 tokens of 250 steps queued in the last 5 s: front-end not connected",
        "slot 3: 3 more tokens of 1 steps were queued before the link came back",
        "slot 3: could not send 1 tokens (queued for the front-end): front-end not connected",
    ]
