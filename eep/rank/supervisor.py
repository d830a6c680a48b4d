"""The slot supervisor: owns the slot's etcd session and runs the worker under it.

It imports no torch and starts in well under a second, so torchrun restarts it cheaply. For
each incarnation it grants a lease, registers ``joining``, starts the worker, and then:
- renews the lease only while the worker's progress counter moves (a hung worker loses the
  lease like a dead one), and publishes the fence deadline to the worker;
- marks the slot ``ready`` when the worker says it is;
- the moment the worker exits, revokes the lease (a crash is seen in milliseconds);
- when the session ends (fenced, lease lost), kills the worker;
then starts the next incarnation.

An etcd outage is ridden out, not fenced (design.md 5.8): the session keeps trying to renew,
the worker keeps serving under the last view it applied, and its fence deadline is pushed on
while it makes progress. If the lease ran out meanwhile, the supervisor re-attaches the same
incarnation under a new lease, provided the committed view still lists it; if the view moved
on without it, the incarnation ends as usual. A worker whose supervisor dies exits too (parent-death
signal in the worker).

In ``baseline`` mode (the full-restart baseline) it starts no next incarnation: once the
lease is released and the worker gone it exits non-zero, so the one torchrun agent over every
local slot tears down all of them and restarts them together.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from eep.events import EventLog
from eep.membership.backoff import Backoff
from eep.membership.errors import (
    EtcdUnavailable,
    Excluded,
    LeaseExpiredInOutage,
    LeaseLost,
    MembershipError,
)
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.registry import SlotRegistration, SlotState
from eep.membership.session import Session, SessionConfig

from .barrier import GroupBarrier, GroupNotUp
from .standby import Standby
from .status import StatusBlock, WorkerState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    etcd: str
    cluster: str
    slot: int
    ttl_s: int = 3
    max_restarts: int = 100
    device: str = "cpu"
    log_dir: str | None = None
    wait_slot_s: float = 30.0
    startup_timeout_s: float = 600.0  # loading weights and warming up do not move progress
    baseline: bool = False  # exit when the worker ends: torchrun restarts every local slot
    group_size: int = 0  # baseline: slots started together (torchrun's LOCAL_WORLD_SIZE)
    group_round: int = 0  # baseline: torchrun's TORCHELASTIC_RESTART_COUNT
    standby: bool = True  # keep a warm standby worker to promote (never in baseline mode)


EXIT_BASELINE_RESTART = 1  # non-zero: torchrun counts a failure and restarts the whole group


class Supervisor:
    def __init__(self, cfg: SupervisorConfig):
        self.cfg = cfg
        self.client = EtcdClient(cfg.etcd)
        self.keys = Keys(cfg.cluster)
        self.status = StatusBlock(cfg.cluster, cfg.slot, create=True)
        self.stop = threading.Event()
        self.worker: subprocess.Popen | None = None
        self.events = EventLog.in_dir(cfg.log_dir, f"supervisor{cfg.slot}")
        self.barrier = (
            GroupBarrier(self.client, self.keys, cfg.slot, cfg.group_size, cfg.group_round)
            if cfg.baseline
            else None
        )
        self.backoff = Backoff(log, f"slot {cfg.slot}")  # between tries at etcd
        use_standby = cfg.standby and not cfg.baseline
        self.standby = Standby(cfg.slot, cfg.log_dir) if use_standby else None

    def run(self) -> int:
        restarts = 0
        while not self.stop.is_set():
            code = self.run_incarnation()
            if self.stop.is_set():
                return 0
            if code is None:
                continue  # no worker was started (etcd away, slot not free): not a restart
            if self.cfg.baseline:
                log.warning(
                    "slot %d: worker ended (%s); exiting so torchrun restarts every slot",
                    self.cfg.slot,
                    code,
                )
                return EXIT_BASELINE_RESTART
            restarts += 1
            if restarts > self.cfg.max_restarts:
                log.error("slot %d: %d worker restarts; giving up", self.cfg.slot, restarts - 1)
                return 1
            log.warning(
                "slot %d: worker ended (%s); starting incarnation %d",
                self.cfg.slot,
                code,
                restarts + 1,
            )
        return 0

    def run_incarnation(self) -> str | None:
        """One incarnation: why its worker ended, or ``None`` when no worker was started
        (etcd did not answer, or the slot could not be registered): the caller tries again
        without counting a restart, so an etcd outage never spends a restart budget."""
        session = self._open_session()
        if session is None:
            return None
        reg = SlotRegistration(self.client, self.keys, session, self.cfg.slot, self.cfg.device)
        try:
            try:
                record = reg.register(wait_s=self.cfg.wait_slot_s)
            except MembershipError as exc:  # etcd away, the lease gone meanwhile, slot taken
                self.backoff.failed(f"registering the slot: {exc}", self.stop)
                return None
            self.backoff.succeeded()
            self.events.emit("registered", slot=self.cfg.slot, incarnation=record.incarnation)
            self.status.reset(record.incarnation)
            self.status.set("lease_id", session.lease_id)
            self.status.set("fence_deadline", session.deadline)
            self.worker = self._spawn(record.incarnation)
            return self._watch(reg)
        except LeaseLost as exc:
            return f"lease lost: {exc}"
        except MembershipError as exc:
            log.error("slot %d: %s", self.cfg.slot, exc)
            time.sleep(0.5)
            return f"membership error: {exc}"
        finally:
            self._end(reg.session)

    def _open_session(self) -> Session | None:
        """The incarnation's session: a lease, renewed while the worker makes progress. While
        etcd does not answer, retry with backoff until it does or the supervisor is stopped."""
        # a worker that stops moving for max(1 s, TTL/3) stops the renewals, so a hang is out
        # of the view within about TTL + 1 s (steps take milliseconds; waits on peers count)
        ttl = SessionConfig(
            ttl_s=self.cfg.ttl_s, stall_s=max(1.0, self.cfg.ttl_s / 3), ride_outages=True
        )
        while not self.stop.is_set():
            session = Session(
                self.client, ttl, progress=self._progress_probe(), name=f"slot {self.cfg.slot}"
            )
            try:
                return session.open()
            except MembershipError as exc:
                self.backoff.failed(f"opening a session: {exc}", self.stop)
        return None

    def _progress_probe(self):
        """What the session watches: the worker's counter once it serves; until then (loading
        weights, warming up: nothing to count) the clock, up to ``startup_timeout_s``."""
        started = time.monotonic()

        def probe() -> float:
            if self.status.get("state") == WorkerState.READY:
                return self.status.get("progress")
            if time.monotonic() - started < self.cfg.startup_timeout_s:
                return time.monotonic()
            return -1.0  # stuck starting up: stop renewing

        return probe

    def _worker_args(self) -> dict:
        return {
            "etcd": self.cfg.etcd,
            "cluster": self.cfg.cluster,
            "slot": self.cfg.slot,
            "log_dir": self.cfg.log_dir,
            # the full-restart baseline reloads every worker's weights from disk
            "baseline": self.cfg.baseline,
        }

    def _spawn(self, incarnation: int) -> subprocess.Popen:
        """The incarnation's worker: the warm standby promoted, or else a cold process."""
        if self.standby is not None and (proc := self.standby.promote(incarnation)):
            log.info(
                "slot %d: standby (pid %d) promoted to incarnation %d",
                self.cfg.slot,
                proc.pid,
                incarnation,
            )
            self.events.emit("standby_promoted", slot=self.cfg.slot, incarnation=incarnation)
            return proc
        out = None
        if self.cfg.log_dir:
            path = os.path.join(self.cfg.log_dir, f"worker{self.cfg.slot}.{incarnation}.log")
            out = open(path, "ab")  # noqa: SIM115 (the child owns it)
        args = {**self._worker_args(), "incarnation": incarnation}
        return subprocess.Popen(
            [sys.executable, "-m", "eep.rank.worker", json.dumps(args)],
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )

    def _watch(self, reg: SlotRegistration) -> str:
        ready, resync_sent = False, 0
        barrier_deadline = time.monotonic() + self.cfg.startup_timeout_s
        while not self.stop.is_set():
            turn = time.monotonic()
            session = reg.session
            code = self.worker.poll()
            if code is not None:
                self.events.emit("worker_exited", slot=self.cfg.slot, code=code)
                return f"worker exited with {code}"
            if session.done.wait(0.02):
                if isinstance(session.loss, LeaseExpiredInOutage) and self._reattach(reg):
                    continue
                self.events.emit("session_lost", slot=self.cfg.slot, reason=str(session.loss))
                return f"session ended: {session.loss}"
            self.status.set("fence_deadline", self._worker_deadline(session))
            if not ready and self.status.get("state") == WorkerState.READY:
                if not self._group_ready(session, barrier_deadline):
                    continue
                if not self._try(reg.update, SlotState.READY, endpoints={"pid": self.worker.pid}):
                    continue  # etcd did not answer: the next turn tries again
                self.events.emit("ready", slot=self.cfg.slot, incarnation=reg.record.incarnation)
                ready = True
                log.info("slot %d: incarnation %d ready", self.cfg.slot, reg.record.incarnation)
            if ready and self.standby is not None:
                # behind a ready worker only: a standby's start never competes with a recovery
                self.standby.ensure(self._worker_args())
            # a resync request and the slots it suspects, as one pair (status.resync_request)
            asked = self.status.resync_request()
            if asked and asked[0] > resync_sent:
                epoch, suspects = asked
                if self._try(reg.update, resync_epoch=epoch, suspects=suspects):
                    resync_sent = epoch
            if time.monotonic() - turn > 0.5:
                # the fence deadline the worker reads was not refreshed meanwhile
                log.warning(
                    "slot %d: one supervision turn took %.2f s",
                    self.cfg.slot,
                    time.monotonic() - turn,
                )
        return "stopped"

    def _worker_deadline(self, session: Session, outage: bool = False) -> float:
        """The fence deadline the worker obeys: the session's, except while etcd does not
        answer and the worker moves (design.md 5.8): then far enough ahead to outlast one
        blocked etcd request of this loop, and pushed on every turn."""
        if outage or session.riding_outage():
            return time.monotonic() + self.cfg.ttl_s + self.client.timeout_s + 1.0
        return session.deadline

    def _reattach(self, reg: SlotRegistration) -> bool:
        """The lease ran out during an etcd outage: the same incarnation under a new lease,
        if the view still lists it. Meanwhile the worker serves on (its deadline is pushed
        while it moves). False: it is excluded, or the worker stopped, or we were stopped."""
        old = reg.session
        seen, moved = old.progress(), time.monotonic()
        while not self.stop.is_set() and self.worker.poll() is None:
            if (now := old.progress()) != seen:
                seen, moved = now, time.monotonic()
            elif time.monotonic() - moved > (old.config.stall_s or self.cfg.ttl_s):
                log.warning("slot %d: the worker stopped moving; not re-attaching", self.cfg.slot)
                return False  # a hang is fenced, outage or not
            self.status.set("fence_deadline", self._worker_deadline(old, outage=True))
            session = Session(
                self.client, old.config, progress=old.progress, name=f"slot {self.cfg.slot}"
            )
            try:
                session.open()
                reg.reattach(session)
            except Excluded as exc:
                session.close(revoke=True)
                log.warning("slot %d: not re-attaching: %s", self.cfg.slot, exc)
                return False
            except MembershipError as exc:  # etcd away again: try again shortly
                session.close(revoke=True)
                self.backoff.failed(f"re-attaching the slot: {exc}", self.stop, cap_s=0.5)
                continue
            self.backoff.succeeded()
            self.status.set("lease_id", session.lease_id)
            self.status.set("fence_deadline", session.deadline)
            self.events.emit(
                "reattached",
                slot=self.cfg.slot,
                incarnation=reg.record.incarnation,
                outage_s=round(old.outage_s(), 3),
            )
            return True
        return False

    def _try(self, update, *args, **kwargs) -> bool:
        """``update`` of the slot record; False when etcd did not answer (the session's own
        renewals decide whether this incarnation lives on: an outage shorter than the fence
        deadline must not end a serving worker). A lost lease still raises."""
        try:
            update(*args, **kwargs)
            return True
        except EtcdUnavailable as exc:
            log.warning("slot %d: updating the slot record: %s; retrying", self.cfg.slot, exc)
            return False

    def _group_ready(self, session: Session, deadline: float) -> bool:
        """True unless this is a baseline slot whose group is not all up yet; past the
        deadline it gives up (raising), so torchrun restarts the group instead of waiting."""
        if self.barrier is None or self.barrier.passed(session.lease_id):
            return True
        if time.monotonic() > deadline:
            raise GroupNotUp(
                f"slot {self.cfg.slot}: not every one of the {self.cfg.group_size} baseline "
                f"slots was up within {self.cfg.startup_timeout_s:.0f} s; read the other "
                "slots' worker logs"
            )
        return False

    def _end(self, session: Session) -> None:
        """Revoke first (survivors stop waiting on this slot), then make sure the worker is gone."""
        self.status.set("fence_deadline", 0.0)
        session.close(revoke=True)
        self.events.emit("lease_released", slot=self.cfg.slot)
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGKILL)
        if self.worker is not None:
            self.worker.wait(timeout=30)
        self.worker = None


def _stop_with_parent(parent: int) -> None:
    """Under torchrun: a supervisor whose agent died is told to stop (SIGTERM), so it ends its
    worker and revokes the lease, as a pod's processes go with its main one; whatever restarts
    the agent starts a fresh supervisor. Without this it would serve on, unsupervised, and the
    restarted agent's supervisor would wait for a slot that is never freed. ``parent``: the
    agent's pid as read at the process's start; if it is no longer the parent when the signal
    is armed, the agent already died."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if parent == 1 or os.getppid() != parent:  # the agent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def main(cfg: SupervisorConfig, stop_with_parent: int = 0) -> int:
    """``stop_with_parent``: the pid of the torchrun agent to stop with (0: none)."""
    sup = Supervisor(cfg)

    def _stop(signum, frame):
        sup.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if stop_with_parent:
        _stop_with_parent(stop_with_parent)
    try:
        return sup.run()
    finally:
        if sup.standby is not None:
            sup.standby.close()
        sup.status.close(unlink=True)
