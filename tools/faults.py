"""Faults that prove they landed: inject into live load, then check the cluster felt it.

A fault is injected only once the front-end reports requests on the target slot that have
streamed at least one token and are not finished (``/debug/slots``). After it, the caller
waits for the states it expects (a view without the slot, the slot back with a new
incarnation, the re-queue counter of the slot moving) with generous timeouts, never by
sleeping and reading once, and :func:`prove` fails the run when the fault missed the load:
- requests were in flight on the slot at the fault;
- at least one was re-queued off it (for a fault that takes the worker out);
- tokens were delivered between the fault and the rejoin, or within 2 s of the view that
  excluded the slot when it was back sooner (the survivors kept serving);
- at least one request was migrated with its KV, where the run covers migration.

The processes a fault can hit: the slot's ``worker``, its ``supervisor`` (the worker dies
with it; torchrun starts a new one), and its torchrun ``agent`` (the supervisor and the worker
die with it, as a pod's processes do; the caller restarts the agent, as a pod's controller
would: :func:`restart_agent`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field

TARGETS = ("worker", "supervisor", "agent")
SERVED_WITHIN_S = 2.0  # prove(): tokens must flow this soon after the exclusion, rejoined or not


class FaultMissed(AssertionError):
    """The fault did not land on live load: the run proves nothing and must fail."""


def slots_state(url: str, timeout_s: float = 10.0) -> dict:
    """The front-end's ``/debug/slots`` with integer slot keys."""
    import requests

    resp = requests.get(f"{url}/debug/slots", timeout=timeout_s)
    resp.raise_for_status()
    body = resp.json()
    body["slots"] = {int(s): v for s, v in body["slots"].items()}
    return body


def wait_live_load(url: str, slot: int, min_emitting: int = 1, timeout_s: float = 120.0) -> dict:
    """Until ``slot`` holds at least ``min_emitting`` unfinished requests that have streamed
    a token; returns that state. Raises :class:`FaultMissed` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    state = slots_state(url)
    while state["slots"][slot]["emitting"] < min_emitting:
        if time.monotonic() > deadline:
            raise FaultMissed(
                f"slot {slot} never held {min_emitting} streaming request(s) within "
                f"{timeout_s:.0f} s (last state {state['slots'][slot]}): offer more load"
            )
        time.sleep(0.01)
        state = slots_state(url)
    return state


@dataclass
class Fault:
    """One injected fault and what the front-end reported just before it."""

    slot: int
    target: str
    signal: str
    pid: int
    at: float  # monotonic
    old_incarnation: int | None
    in_flight: int  # on the slot, just before the fault
    emitting: int
    requeued_before: int  # re-queued off the slot before the fault
    migrated_before: int  # migrated onto the slot before the fault
    epoch_before: int
    excluded_at: float | None = None
    rejoined_at: float | None = None
    requeued: int = 0  # off the slot since the fault
    migrated: int = 0  # onto the slot (after its rejoin) since the fault
    tokens_during: int = 0  # delivered to any client between the fault and the rejoin
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def process_pid(cluster, slot: int, target: str) -> int:
    """The pid of ``slot``'s ``target`` process (see :data:`TARGETS`)."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r} must be one of {TARGETS}.")
    worker = cluster.wait_worker_pid(slot)
    if target == "worker":
        return worker
    if target == "supervisor":
        return _parent(worker)
    if not cluster.opts.torchrun:
        raise ValueError("an agent fault needs a cluster started with torchrun.")
    return cluster.procs[f"slot{slot}"].pid


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def inject(
    cluster,
    slot: int,
    target: str = "worker",
    sig: signal.Signals = signal.SIGKILL,
    min_emitting: int = 1,
    timeout_s: float = 120.0,
) -> Fault:
    """Wait for live load on ``slot``, then send ``sig`` to its ``target`` process."""
    pid = process_pid(cluster, slot, target)
    state = wait_live_load(cluster.url, slot, min_emitting, timeout_s)
    entry = state["slots"][slot]
    os.kill(pid, sig)
    return Fault(
        slot=slot,
        target=target,
        signal=signal.Signals(sig).name,
        pid=pid,
        at=time.monotonic(),
        old_incarnation=entry["incarnation"],
        in_flight=entry["in_flight"],
        emitting=entry["emitting"],
        requeued_before=entry["requeued_from"],
        migrated_before=entry["migrated_to"],
        epoch_before=state["epoch"],
    )


def wait_standbys(cluster, timeout_s: float = 180.0) -> None:
    """Until every slot's newest standby (``worker<slot>.standby<k>.log``) waits to be promoted:
    a kill before that would measure a standby still importing."""
    deadline = time.monotonic() + timeout_s
    for slot in range(cluster.cfg.num_slots):
        while not standby_waiting(cluster.workdir, slot):
            if time.monotonic() > deadline:
                raise FaultMissed(f"slot {slot} has no warm standby after {timeout_s:.0f} s")
            time.sleep(0.1)


def standby_waiting(workdir: str, slot: int) -> bool:
    """Whether ``slot``'s newest standby says it waits to be promoted."""
    prefix = f"worker{slot}.standby"
    logs = [n for n in os.listdir(workdir) if n.startswith(prefix) and n.endswith(".log")]
    if not logs:
        return False
    newest = max(logs, key=lambda n: int(n[len(prefix) : -4]))
    with open(os.path.join(workdir, newest), errors="replace") as f:
        return "waiting to be promoted" in f.read()


def wait_excluded(cluster, fault: Fault, timeout_s: float = 120.0):
    """Until a view without ``fault.slot``'s old incarnation is committed; returns it."""
    view = cluster.watcher.wait_for(
        lambda v: (
            v.epoch > fault.epoch_before and v.incarnation(fault.slot) != fault.old_incarnation
        ),
        timeout_s=timeout_s,
    )
    if view is None:
        raise FaultMissed(f"no view excluded slot {fault.slot} within {timeout_s:.0f} s")
    fault.excluded_at = fault.excluded_at or time.monotonic()
    return view


def wait_tokens_after(load, t: float, timeout_s: float = 120.0) -> float:
    """Until ``load`` streams a token after monotonic time ``t``; returns when the first did
    (``t`` + the stall). Raises :class:`FaultMissed` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        after = [x for x in load.token_times() if x > t]
        if after:
            return after[0]
        time.sleep(0.05)
    raise FaultMissed(f"no token streamed in the {timeout_s:.0f} s after the fault")


def wait_rejoined(cluster, fault: Fault, timeout_s: float = 180.0, whole: bool = True):
    """Until ``fault.slot`` is back with a newer incarnation (and, with ``whole``, every slot
    is a member); returns that view."""

    def back(v) -> bool:
        newer = (v.incarnation(fault.slot) or 0) > (fault.old_incarnation or 0)
        return newer and (not whole or len(v.members) == cluster.cfg.num_slots)

    view = cluster.watcher.wait_for(back, timeout_s=timeout_s)
    if view is None:
        raise FaultMissed(f"slot {fault.slot} did not rejoin within {timeout_s:.0f} s")
    fault.rejoined_at = fault.rejoined_at or time.monotonic()
    return view


def wait_requeued(url: str, fault: Fault, timeout_s: float = 60.0) -> int:
    """Until the front-end has re-queued at least one request off ``fault.slot`` since the
    fault; returns how many. Raises :class:`FaultMissed` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        entry = slots_state(url)["slots"][fault.slot]
        fault.requeued = entry["requeued_from"] - fault.requeued_before
        fault.migrated = entry["migrated_to"] - fault.migrated_before
        if fault.requeued >= 1:
            return fault.requeued
        if time.monotonic() > deadline:
            raise FaultMissed(
                f"nothing was re-queued off slot {fault.slot} within {timeout_s:.0f} s of the "
                f"{fault.target} {fault.signal}: the fault missed the load"
            )
        time.sleep(0.05)


def wait_migrated(url: str, fault: Fault, timeout_s: float = 60.0) -> int:
    """Until at least one request was moved onto ``fault.slot`` with its KV since the fault
    (after its rejoin, the front-end rebalances in-flight load onto it); returns how many."""
    deadline = time.monotonic() + timeout_s
    while True:
        fault.migrated = (
            slots_state(url)["slots"][fault.slot]["migrated_to"] - fault.migrated_before
        )
        if fault.migrated >= 1:
            return fault.migrated
        if time.monotonic() > deadline:
            raise FaultMissed(
                f"nothing was migrated onto slot {fault.slot} within {timeout_s:.0f} s of its "
                "rejoin: no request was in flight to move"
            )
        time.sleep(0.05)


def restart_agent(cluster, slot: int, timeout_s: float = 60.0) -> None:
    """After an agent fault: wait for its process tree to be gone, then start the slot's
    agent again (what a pod's controller does)."""
    proc = cluster.procs[f"slot{slot}"]
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise FaultMissed(f"slot {slot}'s agent did not exit: {exc}") from exc
    cluster.start_slot(slot)


def prove(fault: Fault, load, url: str, requeue: bool = True, migration: bool = False) -> Fault:
    """Fail unless ``fault`` landed on live load (see the module docstring). Reads the
    front-end's counters once more; ``load`` counts the tokens delivered meanwhile."""
    entry = slots_state(url)["slots"][fault.slot]
    fault.requeued = entry["requeued_from"] - fault.requeued_before
    fault.migrated = entry["migrated_to"] - fault.migrated_before
    # the survivors' service: until the rejoin, and at least SERVED_WITHIN_S past the view that
    # excluded the slot (a slot whose warm standby rejoins a fraction of a second after that
    # view may be back before the survivors had a token due)
    excluded = fault.excluded_at or fault.at
    end = max(fault.rejoined_at or time.monotonic(), excluded + SERVED_WITHIN_S)
    if load is not None:
        while not load.tokens_between(fault.at, end) and time.monotonic() < end:
            time.sleep(0.02)  # the window reaches past now: wait for a token, or its end
    fault.tokens_during = load.tokens_between(fault.at, end) if load is not None else 0
    missed = []
    if fault.emitting < 1:
        missed.append(f"no request was streaming on slot {fault.slot} at the fault")
    if requeue and fault.requeued < 1:
        missed.append(f"nothing was re-queued off slot {fault.slot}")
    if load is not None and fault.tokens_during < 1:
        missed.append(
            f"no token was delivered between the fault and the rejoin (or within "
            f"{SERVED_WITHIN_S:g} s of the exclusion)"
        )
    if migration and fault.migrated < 1:
        missed.append(f"nothing was migrated onto the rejoined slot {fault.slot} with its KV")
    if missed:
        raise FaultMissed(
            f"{fault.target} {fault.signal} of slot {fault.slot}: " + "; ".join(missed)
        )
    return fault


# --- faults during a rejoining worker's pull of its experts -------------------------------
#
# The cluster must run with ``RuntimeConfig.pull_hold_s`` > 0: a worker's start-up pull, once
# planned, is held open that long before any byte moves, and the worker says so with a
# ``pull_started`` event (its source slots) in its own events file. ``weights_loaded`` in the
# same file marks the pull's end, so its absence at a kill proves the kill was mid-pull.


def worker_events(cluster, slot: int, incarnation: int) -> list[dict]:
    """The events of ``slot``'s worker ``incarnation`` so far (``[]`` before it starts)."""
    import json

    path = os.path.join(cluster.workdir, f"events-worker{slot}.{incarnation}.jsonl")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    # a line being appended may be cut short: only whole lines count
    return [json.loads(line) for line in lines if line.endswith("}")]


def _incarnations_started(cluster, slot: int) -> list[int]:
    prefix = f"events-worker{slot}."
    names = [n for n in os.listdir(cluster.workdir) if n.startswith(prefix)]
    return sorted(int(n[len(prefix) : -len(".jsonl")]) for n in names if n.endswith(".jsonl"))


def wait_pull_started(cluster, slot: int, after_incarnation: int, timeout_s: float = 120.0):
    """Until a worker of ``slot`` newer than ``after_incarnation`` has planned its pull;
    returns its ``pull_started`` event (``incarnation``, ``pid``, ``sources``, ``mono``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for inc in _incarnations_started(cluster, slot):
            if inc <= after_incarnation:
                continue
            for ev in worker_events(cluster, slot, inc):
                if ev["event"] == "pull_started":
                    return ev
        time.sleep(0.02)
    raise FaultMissed(
        f"no worker of slot {slot} after incarnation {after_incarnation} started pulling its "
        f"experts within {timeout_s:.0f} s: read its worker and supervisor logs"
    )


def loaded_before(cluster, slot: int, incarnation: int, at: float) -> dict | None:
    """``slot``'s worker ``incarnation``'s ``weights_loaded`` event if it came before ``at``
    (monotonic), else ``None``: its pull was still open at ``at``."""
    for ev in worker_events(cluster, slot, incarnation):
        if ev["event"] == "weights_loaded" and ev["mono"] <= at:
            return ev
    return None


def wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    """Until ``pid`` has exited (a zombie not yet reaped counts as gone: it runs no code)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise FaultMissed(f"pid {pid} was still running after {timeout_s:.0f} s")


@dataclass
class PullKill:
    """A rejoining worker SIGKILLed while its pull was open."""

    slot: int
    incarnation: int
    pid: int
    pull_started_at: float  # monotonic
    at: float  # monotonic

    def to_dict(self) -> dict:
        return asdict(self)


def kill_mid_pull(cluster, started: dict) -> PullKill:
    """SIGKILL the worker of a ``pull_started`` event (see :func:`wait_pull_started`), wait
    until it is gone, and prove the kill was mid-pull: it never logged ``weights_loaded``.
    Raises :class:`FaultMissed` otherwise."""
    slot, inc, pid = started["slot"], started["incarnation"], started["pid"]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            alive = b"eep.rank.worker" in f.read()
    except FileNotFoundError:
        alive = False
    if not alive:
        raise FaultMissed(f"pid {pid}, slot {slot}'s pulling worker, was gone before the kill")
    os.kill(pid, signal.SIGKILL)
    kill = PullKill(slot, inc, pid, started["mono"], time.monotonic())
    wait_gone(pid)
    done = loaded_before(cluster, slot, inc, float("inf"))
    if done is not None:
        raise FaultMissed(
            f"slot {slot} incarnation {inc} had loaded its weights before the kill "
            f"(+{done['mono'] - kill.pull_started_at:.2f} s after its pull started): raise "
            "pull_hold_s"
        )
    return kill
