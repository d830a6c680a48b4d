"""A lease-backed session: the proof that a process still holds its slot.

The session grants a lease and renews it every TTL/3 from a background thread, but only while
the owner's progress probe keeps moving: a hung serving loop must lose its lease exactly like a
dead process. The owner also gets a self-fence deadline on the monotonic clock,
``last successful renewal (time sent) + TTL - margin``: past it, the lease may already be gone
on the server, so the owner must act as if it were (``check()`` raises :class:`Fenced`).
A renewal's clock starts when it is sent, and etcd only ever extends a lease (a leader change
resets it to the full TTL), so the deadline is a safe lower bound of the server's expiry.

With ``ride_outages`` (the slot supervisors) a deadline that passes while etcd does not
answer and the owner still makes progress does not end the session: it *rides* the outage,
renewing every 0.1 s, and ``check()`` raises :class:`EtcdUnavailable` instead of fencing.
When etcd answers again the lease either lives (renewed as usual) or is gone, and the session
ends with :class:`LeaseExpiredInOutage`, which the owner may answer by re-attaching under a
new lease (design.md 5.8 argues why serving on is safe). A hang is never ridden out: no
progress for ``stall_s`` stops the renewals, and the deadline then fences as always.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import EtcdRequestError, EtcdUnavailable, Fenced, LeaseExpiredInOutage, LeaseLost
from .etcd import EtcdClient

log = logging.getLogger(__name__)

OUTAGE_TAIL_S = 30.0  # a lease lost this soon after renewals worked again counts as the outage's


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """``ttl_s``: lease TTL asked of etcd; ``margin_s``: fence this long before it runs out;
    ``stall_s``: stop renewing when the progress probe has not moved for this long
    (default: the TTL); ``ride_outages``: past the deadline, keep going while etcd does not
    answer and the owner makes progress (see the module docstring)."""

    ttl_s: int = 3
    margin_s: float = 0.3
    stall_s: float | None = None
    ride_outages: bool = False

    def __post_init__(self) -> None:
        if self.ttl_s < 1:
            raise ValueError(f"lease TTL must be at least 1 s, got {self.ttl_s}.")
        if not 0 <= self.margin_s < self.ttl_s / 2:
            raise ValueError(
                f"fence margin {self.margin_s} s must be >= 0 and under half "
                f"the TTL ({self.ttl_s} s)."
            )


class Session:
    """One lease, renewed while ``progress()`` moves. Use as a context manager or
    :meth:`open` / :meth:`close`.

    ``done`` is set when the session ends for any reason (closed, lease lost, fenced);
    ``loss`` then says why. ``progress`` returns any value that changes when the owner makes
    progress (a step counter, a heartbeat); ``None`` means always renew.
    """

    def __init__(
        self,
        client: EtcdClient,
        config: SessionConfig | None = None,
        progress: Callable[[], object] | None = None,
        name: str = "session",
    ):
        self.client = client
        self.config = config or SessionConfig()
        self.progress = progress
        self.name = name
        self.lease_id = 0
        self.ttl_s = self.config.ttl_s
        self.done = threading.Event()
        self.loss: LeaseLost | None = None
        self._stop = threading.Event()
        self._last_renewal = 0.0
        self._failing_since: float | None = None  # first failed renewal since the last success
        self._stalled = False  # the progress probe stopped moving: renewals withheld
        self.last_failure = 0.0  # monotonic time of the last failed renewal (0: none yet)
        self._recovered_at: float | None = None  # when renewals last worked again after failing
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> Session:
        sent = time.monotonic()
        self.lease_id, self.ttl_s = self.client.lease_grant(self.config.ttl_s)
        self._last_renewal = sent
        self._thread = threading.Thread(target=self._renew_loop, name=self.name, daemon=True)
        self._thread.start()
        log.debug("%s: lease %x granted, ttl %d s", self.name, self.lease_id, self.ttl_s)
        return self

    def close(self, revoke: bool = True) -> None:
        """Stop renewing; with ``revoke``, delete the lease (and its keys) now."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.client.timeout_s + 1)
        if revoke and self.lease_id and self.loss is None:
            try:
                self.client.lease_revoke(self.lease_id)
            except (EtcdUnavailable, EtcdRequestError) as exc:
                log.warning(
                    "%s: revoking lease %x failed (%s); it expires in %d s",
                    self.name,
                    self.lease_id,
                    exc,
                    self.ttl_s,
                )
        self._end(None)

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- fencing ---------------------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """Monotonic time after which the lease may be gone on the server."""
        return self._last_renewal + self.ttl_s - self.config.margin_s

    def riding_outage(self) -> bool:
        """Renewals fail because etcd does not answer while the owner makes progress
        (``ride_outages`` sessions only): past the deadline, the session goes on."""
        return (
            self.config.ride_outages
            and not self.done.is_set()
            and self._failing_since is not None
            and not self._stalled
        )

    def outage_s(self) -> float:
        """How long renewals have been failing (0 while they succeed)."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    def alive(self) -> bool:
        return not self.done.is_set() and (time.monotonic() < self.deadline or self.riding_outage())

    def check(self) -> None:
        """Raise unless the session provably still holds its lease. Call before every write
        made on the slot's behalf. While riding an outage this raises
        :class:`EtcdUnavailable` (a write could not reach etcd anyway), not :class:`Fenced`."""
        if self.loss is not None:
            raise self.loss
        if self.done.is_set():
            raise LeaseLost(f"{self.name}: session closed")
        if time.monotonic() >= self.deadline:
            if self.riding_outage():
                raise EtcdUnavailable(
                    f"{self.name}: etcd has not answered a renewal for {self.outage_s():.1f} s"
                )
            self._end(Fenced(f"{self.name}: no lease renewal for {self.ttl_s} s; fenced"))
            raise self.loss  # type: ignore[misc]

    def _end(self, loss: LeaseLost | None) -> None:
        if self.done.is_set():
            return
        self.loss = loss
        if loss is not None:
            log.warning("%s", loss)  # every loss names the session
        self._stop.set()
        self.done.set()

    # --- renewal ---------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        interval = self.ttl_s / 3
        stall_s = self.config.stall_s if self.config.stall_s is not None else float(self.ttl_s)
        last_seen = self.progress() if self.progress else None
        last_change = time.monotonic()
        # the first renewal is due an interval after the grant was *sent*, as the deadline
        # counts from then: a grant that took long (a loaded host, etcd just back) must not
        # push the first renewal past the fence deadline (a healthy worker fenced just after
        # re-attaching, seen under two busy processes)
        due = self._last_renewal + interval
        wait = max(0.0, due - time.monotonic())
        said_riding = 0.0
        while not self._stop.wait(wait):
            now = time.monotonic()
            if now - due > interval / 2:
                # the renewal thread itself was not scheduled in time (a starved host): said
                # here, so a fence that follows is explained in the owner's log
                log.warning("%s: renewal loop woke %.2f s late", self.name, now - due)
            if self.progress is not None:
                seen = self.progress()
                if seen != last_seen:
                    last_seen, last_change, self._stalled = seen, now, False
                elif now - last_change > stall_s:
                    self._stalled = True
            if now >= self.deadline:
                if not self.riding_outage():
                    self._end(Fenced(f"{self.name}: lease {self.lease_id:x} not renewed in time"))
                    return
                if now - said_riding >= 5.0:
                    said_riding = now
                    log.warning(
                        "%s: etcd has not answered for %.1f s; serving on under the last view "
                        "and renewing as soon as it does",
                        self.name,
                        self.outage_s(),
                    )
            if self._stalled:
                log.warning(
                    "%s: owner made no progress for %.1f s; not renewing",
                    self.name,
                    now - last_change,
                )
                wait = interval
                due = time.monotonic() + wait
                continue
            wait = self._renew_once(now, interval)
            due = time.monotonic() + wait

    def _renew_once(self, sent: float, interval: float) -> float:
        """One keepalive; returns how long to wait before the next one. The request is
        bounded by half the renewal interval (not the client's timeout, 2 s by default): a
        renewal that stalls on a dead connection must leave time for retries before the
        fence deadline, ``TTL - margin`` after the last success (2.7 s at TTL 3)."""
        try:
            ttl = self.client.lease_keepalive(self.lease_id, timeout_s=max(0.25, interval / 2))
        except (EtcdUnavailable, EtcdRequestError) as exc:
            # etcd restarting or unreachable: retry quickly until the fence deadline (or, when
            # riding outages, until it answers)
            self.last_failure = time.monotonic()
            if self._failing_since is None:  # the first of a run: the rest are said every 5 s
                log.info("%s: renewal failed (%s); retrying", self.name, exc.__class__.__name__)
                self._failing_since = sent
            return min(0.1, interval)
        took = time.monotonic() - sent
        if took > interval / 2:
            log.warning(
                "%s: a renewal took %.2f s (asked to take %.2f)", self.name, took, interval / 2
            )
        if ttl <= 0:
            # an outage, or just after one: a member that was stopped past the TTL may revoke
            # leases as it resumes even though they were renewed through another meanwhile
            # (etcd 3.4, issue 15247); re-attaching is safe either way (it needs the view)
            after = self._recovered_at is not None and sent - self._recovered_at < OUTAGE_TAIL_S
            if self.config.ride_outages and (self._failing_since is not None or after):
                self._end(
                    LeaseExpiredInOutage(
                        f"{self.name}: lease {self.lease_id:x} ran out during or just after an "
                        "etcd outage"
                    )
                )
            else:
                self._end(LeaseLost(f"{self.name}: lease {self.lease_id:x} expired or was revoked"))
            return interval
        if self._failing_since is not None:
            log.info("%s: renewed again after %.1f s", self.name, sent - self._failing_since)
            self._recovered_at = sent
        self._last_renewal, self._failing_since = sent, None
        return interval
