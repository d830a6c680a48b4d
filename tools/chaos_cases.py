"""The fault cases of ``eep bench chaos``: what each injects, waits for and proves.

A case runs against a cluster under closed-loop load and returns a :class:`CaseResult`: the
faults injected into live load (each later proven by :func:`eep.tools.faults.prove` and
waited back with :func:`eep.tools.faults.wait_rejoined`) and the case's own proofs. A case
whose premise did not hold (two kills not within one TTL, slot A already back when slot B
was killed, a pull already finished at the kill) raises :class:`FaultMissed`: the run proves
nothing and fails. The slots hit rotate with the repeat, so every slot takes faults.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eep.membership.commit import read_view

from . import faults
from .faults import Fault, FaultMissed

if TYPE_CHECKING:
    from eep.launcher import Cluster


class CaseFailed(AssertionError):
    """The cluster did not do what the case expects of it (a runtime bug, not a miss)."""


@dataclass
class Ctx:
    """What a case needs: the cluster under load and which repeat this is."""

    cluster: Cluster
    repeat: int
    ttl_s: int
    timeout_s: float

    def slot(self, offset: int = 0) -> int:
        return (self.repeat + offset) % self.cluster.cfg.num_slots


@dataclass
class CaseResult:
    faults: list[Fault]  # faults on live load: proven and waited back by the bench
    proofs: dict = field(default_factory=dict)  # the case's own evidence, for the JSON
    checks: list[Callable[[], None]] = field(default_factory=list)  # run after the rejoins
    side: list[dict] = field(default_factory=list)  # faults on no load, proven when injected


def _kill(ctx: Ctx, slot: int, target: str = "worker", sig=signal.SIGKILL) -> Fault:
    fault = faults.inject(ctx.cluster, slot, target, sig, timeout_s=ctx.timeout_s)
    faults.wait_excluded(ctx.cluster, fault, timeout_s=ctx.timeout_s)
    faults.wait_requeued(ctx.cluster.url, fault, timeout_s=ctx.timeout_s)
    return fault


def _must_exit(pid: int, what: str, timeout_s: float = 30.0) -> None:
    """Until ``pid`` has exited; :class:`CaseFailed` naming ``what`` if it does not."""
    try:
        faults.wait_gone(pid, timeout_s)
    except FaultMissed as exc:
        raise CaseFailed(f"{what} (pid {pid}) is still running: {exc}") from exc


def worker_kill(ctx: Ctx) -> CaseResult:
    """SIGKILL the worker: its supervisor revokes the lease at once."""
    return CaseResult([_kill(ctx, ctx.slot())])


def worker_stop(ctx: Ctx) -> CaseResult:
    """SIGSTOP the worker: its progress stops, the supervisor stops renewing, the lease
    expires (TTL), and the supervisor kills the hung worker before restarting it."""
    fault = _kill(ctx, ctx.slot(), sig=signal.SIGSTOP)

    def killed_by_supervisor() -> None:
        try:
            _must_exit(fault.pid, f"slot {fault.slot}'s hung worker, after its rejoin,", 10.0)
        except CaseFailed:
            os.kill(fault.pid, signal.SIGKILL)  # leave no stopped process behind
            raise

    return CaseResult([fault], checks=[killed_by_supervisor])


def supervisor_kill(ctx: Ctx) -> CaseResult:
    """SIGKILL the supervisor: the worker dies with it (parent-death signal), nobody revokes
    the lease, so it expires after the TTL; torchrun starts a new supervisor."""
    slot = ctx.slot()
    worker = ctx.cluster.wait_worker_pid(slot)
    fault = _kill(ctx, slot, "supervisor")
    _must_exit(worker, f"slot {slot}'s worker, whose supervisor was killed,")
    return CaseResult([fault], {"worker_pid": worker, "worker_exited": True})


def agent_kill(ctx: Ctx) -> CaseResult:
    """SIGKILL the torchrun agent: the supervisor gets SIGTERM (parent-death signal), ends
    its worker and revokes the lease; the agent is then started again, as a pod controller
    would (:func:`eep.tools.faults.restart_agent`)."""
    slot = ctx.slot()
    supervisor = faults.process_pid(ctx.cluster, slot, "supervisor")
    fault = faults.inject(ctx.cluster, slot, "agent", timeout_s=ctx.timeout_s)
    faults.restart_agent(ctx.cluster, slot, timeout_s=ctx.timeout_s)
    faults.wait_excluded(ctx.cluster, fault, timeout_s=ctx.timeout_s)
    faults.wait_requeued(ctx.cluster.url, fault, timeout_s=ctx.timeout_s)
    _must_exit(supervisor, f"slot {slot}'s supervisor, whose agent was killed,")
    return CaseResult([fault], {"supervisor_pid": supervisor, "supervisor_exited": True})


def two_in_ttl(ctx: Ctx) -> CaseResult:
    """SIGKILL the workers of two different slots, the second within one TTL of the first."""
    first = faults.inject(ctx.cluster, ctx.slot(), timeout_s=ctx.timeout_s)
    second = faults.inject(ctx.cluster, ctx.slot(1), timeout_s=ctx.timeout_s)
    apart = second.at - first.at
    if apart >= ctx.ttl_s:
        raise FaultMissed(f"the two kills were {apart:.2f} s apart, not within the TTL")
    for fault in (first, second):
        faults.wait_excluded(ctx.cluster, fault, timeout_s=ctx.timeout_s)
        faults.wait_requeued(ctx.cluster.url, fault, timeout_s=ctx.timeout_s)
    return CaseResult([first, second], {"apart_s": round(apart, 3)})


def kill_during_rejoin(ctx: Ctx) -> CaseResult:
    """SIGKILL slot A's worker; once a view excludes it, SIGKILL slot B's while A's next
    worker is still starting. Valid only if no committed view held A's new incarnation yet
    when B was killed (read from etcd right after the kill, so a late watcher cannot hide a
    rejoin)."""
    first = _kill(ctx, ctx.slot())
    second = faults.inject(ctx.cluster, ctx.slot(1), timeout_s=ctx.timeout_s)
    view, _ = read_view(ctx.cluster.client, ctx.cluster.keys)
    a_back = (view.incarnation(first.slot) or 0) > (first.old_incarnation or 0)
    if a_back:
        raise FaultMissed(
            f"slot {first.slot} was back (view {view.epoch}) when slot {second.slot} was "
            "killed: not a kill during a rejoin"
        )
    faults.wait_excluded(ctx.cluster, second, timeout_s=ctx.timeout_s)
    faults.wait_requeued(ctx.cluster.url, second, timeout_s=ctx.timeout_s)
    proofs = {"a_back_at_b_kill": a_back, "view_at_b_kill": view.epoch}
    return CaseResult([first, second], proofs)


def rejoiner_killed_mid_pull(ctx: Ctx) -> CaseResult:
    """SIGKILL slot A's worker; when A's next worker has planned its pull (held open by
    ``pull_hold_s``) and not loaded its weights, SIGKILL that worker too. A's supervisor
    starts a third incarnation, which must rejoin."""
    fault = _kill(ctx, ctx.slot())
    started = faults.wait_pull_started(
        ctx.cluster, fault.slot, fault.old_incarnation, timeout_s=ctx.timeout_s
    )
    pulled = faults.kill_mid_pull(ctx.cluster, started)

    def back_after_it() -> None:
        back = ctx.cluster.watcher.latest.incarnation(fault.slot) or 0
        if back <= pulled.incarnation:
            raise CaseFailed(f"slot {fault.slot} rejoined as {back}, not after {pulled}")

    return CaseResult([fault], checks=[back_after_it], side=[pulled.to_dict()])


def source_killed_mid_pull(ctx: Ctx) -> CaseResult:
    """SIGKILL slot A's worker; while A's next worker holds its planned pull open, SIGKILL
    the worker of a slot it plans to read from. A's pull must fail over to another replica
    or the checkpoint and finish: the same incarnation logs ``weights_loaded`` naming the
    dead source as failed, and it rejoins; so does the source's slot."""
    first = _kill(ctx, ctx.slot())
    started = faults.wait_pull_started(
        ctx.cluster, first.slot, first.old_incarnation, timeout_s=ctx.timeout_s
    )
    if not started["sources"]:
        raise FaultMissed(f"slot {first.slot}'s pull planned no peer source: nothing to kill")
    source = started["sources"][ctx.repeat % len(started["sources"])]
    second = faults.inject(ctx.cluster, source, timeout_s=ctx.timeout_s)
    inc = started["incarnation"]
    if faults.loaded_before(ctx.cluster, first.slot, inc, second.at) is not None:
        raise FaultMissed(f"slot {first.slot}'s pull had finished when source {source} died")
    faults.wait_excluded(ctx.cluster, second, timeout_s=ctx.timeout_s)
    faults.wait_requeued(ctx.cluster.url, second, timeout_s=ctx.timeout_s)
    proofs = {"puller": {"slot": first.slot, "incarnation": inc}, "source": source}

    def finished_around_it() -> None:
        done = faults.loaded_before(ctx.cluster, first.slot, inc, float("inf"))
        back = ctx.cluster.watcher.latest.incarnation(first.slot)
        if done is None or back != inc:
            raise CaseFailed(
                f"slot {first.slot} incarnation {inc} did not finish its pull and rejoin "
                f"(weights_loaded: {done is not None}, rejoined as {back})"
            )
        proofs["failed_sources"] = done.get("failed_sources", {})
        if str(source) not in proofs["failed_sources"]:
            raise FaultMissed(
                f"slot {first.slot}'s pull never read from source {source} after its death "
                f"(failed sources {proofs['failed_sources']}): the kill was not mid-pull"
            )

    return CaseResult([first, second], proofs, [finished_around_it])


CASES: dict[str, Callable[[Ctx], CaseResult]] = {
    "worker-kill": worker_kill,
    "worker-stop": worker_stop,
    "supervisor-kill": supervisor_kill,
    "agent-kill": agent_kill,
    "two-in-ttl": two_in_ttl,
    "kill-during-rejoin": kill_during_rejoin,
    "rejoiner-killed-mid-pull": rejoiner_killed_mid_pull,
    "source-killed-mid-pull": source_killed_mid_pull,
}

# Cases that need the rejoining worker's pull held open (``RuntimeConfig.pull_hold_s``).
PULL_CASES = ("rejoiner-killed-mid-pull", "source-killed-mid-pull")
