"""How a process waits between tries at an etcd that does not answer: 0.1 s doubling to 2 s,
the first failure and every 10th logged, so an outage is visible but not a flood. The slot
supervisor and the front-end both retry this way; neither exits because etcd is away."""

from __future__ import annotations

import logging
import threading

FIRST_S, MOST_S, LOG_EVERY = 0.1, 2.0, 10


class Backoff:
    def __init__(self, log: logging.Logger, prefix: str):
        self.log, self.prefix = log, prefix
        self.tries = 0  # consecutive failures since the last success

    def failed(self, what: str, stop: threading.Event, cap_s: float = MOST_S) -> None:
        """Count a failure, log it if due, and wait, at most ``cap_s`` (less if ``stop`` is
        set meanwhile)."""
        self.tries += 1
        if self.tries == 1 or self.tries % LOG_EVERY == 0:
            self.log.warning("%s: etcd: %s (try %d); retrying", self.prefix, what, self.tries)
        stop.wait(min(cap_s, FIRST_S * 2 ** min(self.tries - 1, 5)))

    def succeeded(self) -> int:
        """Reset; returns how many tries had failed before."""
        tries, self.tries = self.tries, 0
        return tries
