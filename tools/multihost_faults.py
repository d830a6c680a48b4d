"""Faults of a whole host under live load, and their proof (a :class:`MultiHostCluster`).

:func:`host_fault` is the one procedure every host fault follows: wait until the host's ranks
hold streaming requests, ``cut`` (kill the host, take its link down, cut it from etcd or from
its peers' data plane), wait for the view that excludes every rank of the host, check what
must hold while it is out, ``heal``, and wait until every rank of the host is back under a new
incarnation. A run that cannot show the fault landed on live load raises
:class:`~eep.tools.faults.FaultMissed`; an invariant that breaks raises ``AssertionError``.

While the host is out:
- the front-end re-queued at least one request off the host (it was serving);
- once the front-end serves the excluding view, it accepts no token of the host's ranks
  (their counts stay frozen while the survivors stream on) and ``stale_accepted`` stays 0;
- with ``alive``: the host's workers are still alive (excluded, not dead), so the run shows
  that their exclusion, not their death, kept their output away from clients;
- with ``migration``: after the rejoin, a request moves onto the host with its KV (the KV
  crosses hosts through the transfer engine, verified like any pull).

The timeline (seconds from the cut) and the invariants come back as a dict, for the tests and
for ``eep bench multihost``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import faults
from .faults import FaultMissed
from .netns import ETCD_CLIENT_PORT, ETCD_PEER_PORT


def _streamed(load) -> int:
    return sum(len(s.times) for s in load.snapshot())


def _front_serving(url: str, epoch: int, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (state := faults.slots_state(url))["epoch"] < epoch:
        if time.monotonic() > deadline:
            raise AssertionError(f"the front-end never served view {epoch}")
        time.sleep(0.05)
    return state


def _first_token_after(load, t: float) -> float | None:
    after = [x for x in load.token_times() if x > t]
    return min(after) if after else None


def host_fault(
    cluster,
    load,
    host: int,
    cut: Callable[[], None],
    heal: Callable[[], None],
    *,
    alive: bool,
    migration: bool = False,
    exclude_timeout_s: float = 90.0,
    rejoin_timeout_s: float = 240.0,
) -> dict:
    """One fault of ``host`` (see the module docstring); returns its timeline and checks."""
    victims = tuple(cluster.layout.slots_by_host[host])
    state = faults.wait_live_load(cluster.url, victims[0])
    old = {s: state["slots"][s]["incarnation"] for s in victims}
    pids = {s: cluster.wait_worker_pid(s) for s in victims}
    in_flight = sum(state["slots"][s]["in_flight"] for s in victims)
    requeued_before = sum(state["slots"][s]["requeued_from"] for s in victims)
    migrated_before = sum(state["slots"][s]["migrated_to"] for s in victims)
    cut_at = time.monotonic()
    cut()
    excluded = cluster.watcher.wait_for(
        lambda v: all(v.incarnation(s) != old[s] for s in victims), exclude_timeout_s
    )
    if excluded is None:
        raise FaultMissed(f"host {host}'s slots {victims} were never excluded")
    excluded_at = time.monotonic()
    front = _front_serving(cluster.url, excluded.epoch)
    requeued = sum(front["slots"][s]["requeued_from"] for s in victims) - requeued_before
    if requeued < 1:
        raise FaultMissed(f"no request was on host {host} when it was cut off")
    frozen = {s: front["slots"][s]["tokens"] for s in victims}
    survivors_from = _streamed(load)
    assert load.wait_tokens(survivors_from + 30, 90), "the survivors did not serve on"
    if alive:
        for slot, pid in pids.items():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise AssertionError(f"slot {slot}'s worker died; it should be cut off") from None
    after = faults.slots_state(cluster.url)
    for slot in victims:
        assert after["slots"][slot]["tokens"] == frozen[slot], f"a token of slot {slot} counted"
    assert after["stale_accepted"] == 0, after["stale_accepted"]
    heal_at = time.monotonic()
    heal()
    back = cluster.watcher.wait_for(
        lambda v: (
            all((v.incarnation(s) or 0) > old[s] for s in victims)
            and len(v.members) == cluster.layout.num_slots
        ),
        rejoin_timeout_s,
    )
    if back is None:
        raise FaultMissed(f"host {host}'s slots did not rejoin within {rejoin_timeout_s} s")
    rejoined_at = time.monotonic()
    migrated = _wait_migrated(cluster.url, victims, migrated_before) if migration else None
    resumed = _first_token_after(load, excluded_at)
    return {
        "host": host,
        "slots": list(victims),
        "in_flight_at_cut": in_flight,
        "requeued": requeued,
        "victim_tokens_frozen": frozen,
        "stale_accepted": after["stale_accepted"],
        "migrated_with_kv": migrated,
        "excluded_epoch": excluded.epoch,
        "rejoined_epoch": back.epoch,
        "timeline_s": {
            "excluded": round(excluded_at - cut_at, 3),
            "first_token_after_exclusion": round(resumed - cut_at, 3) if resumed else None,
            "healed": round(heal_at - cut_at, 3),
            "rejoined": round(rejoined_at - cut_at, 3),
            "rejoined_after_heal": round(rejoined_at - heal_at, 3),
        },
    }


def _wait_migrated(url: str, victims, before: int, timeout_s: float = 90.0) -> int:
    """Until a request moved onto a rejoined slot of the host with its KV (pulled across
    hosts through the transfer engine); returns how many."""
    deadline = time.monotonic() + timeout_s
    while (
        moved := sum(faults.slots_state(url)["slots"][s]["migrated_to"] for s in victims)
    ) <= before:
        if time.monotonic() > deadline:
            raise FaultMissed(f"no request moved onto slots {victims} with its KV after the rejoin")
        time.sleep(0.05)
    return moved - before


@dataclass(frozen=True)
class HostFault:
    """How to inflict one fault on a host and heal it; ``alive``: its workers outlive it
    (see :func:`host_fault`)."""

    cut: Callable[[], None]
    heal: Callable[[], None]
    alive: bool


def host_faults(cluster, host: int) -> dict[str, HostFault]:
    """The host faults by name, on ``host`` of ``cluster`` (the tests' and the bench's)."""
    hosts = cluster.hosts
    return {
        # cut off, not dead: its exclusion keeps its tokens out
        "partition": HostFault(lambda: hosts.link_down(host), lambda: hosts.link_up(host), True),
        # every process, its etcd member too; back as an operator brings it (eep launch --join)
        "kill": HostFault(
            lambda: cluster.kill_host(host), lambda: cluster.restart_host(host), False
        ),
        # its data plane is up: the epoch tags keep it out
        "etcd-cut": HostFault(
            lambda: hosts.cut_ports(host, ETCD_PORTS), lambda: hosts.heal_ports(host), True
        ),
        # it reaches etcd: it sees its exclusion (by suspicion) and fences at once
        "dataplane-cut": HostFault(
            lambda: hosts.cut_all_but(host, [*ETCD_PORTS, *frontend_ports(cluster)]),
            lambda: hosts.heal_all_but(host),
            False,
        ),
    }


def frontend_ports(cluster) -> list[int]:
    """The front-end's HTTP and rank-link ports (left open by a data-plane-only cut)."""
    info = cluster.client.get(cluster.keys.frontend).json()
    return [int(info["http"]["port"]), int(info["ranks"]["port"])]


ETCD_PORTS = (ETCD_CLIENT_PORT, ETCD_PEER_PORT)  # on every host (eep.tools.netns)
