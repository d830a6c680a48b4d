"""Control-plane faults under live load (design.md 5.8):
- the leader coordinator killed together with a worker: a standby coordinator, which
  `eep launch` starts by default, takes over;
- etcd stalled (SIGSTOP) or restarted for 10 s, a global outage: tokens keep flowing through
  it, no view changes, no rank is fenced or restarted, leases that ran out are re-attached;
- one rank cut off from etcd alone (a TCP relay on its path, cut): it is excluded, no token it
  computes after that view reaches a client, and it comes back once the path heals.
Every request completes with the single-process result."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from eep.launcher import Cluster
from eep.membership.errors import MembershipError
from eep.tools import faults
from eep.tools.relay import TcpRelay

from .conftest import load_with_faults, start_cluster

pytestmark = pytest.mark.slow


VICTIM = 3  # the slot whose path to etcd goes through a relay (a passthrough until cut)
OUTAGE_S = 10.0


@pytest.fixture(scope="module")
def relay():
    box: dict = {}

    class Relayed(Cluster):
        """Slot VICTIM's supervisor and worker reach etcd through the relay alone."""

        def start_slot(self, slot: int) -> None:
            if slot != VICTIM:
                return super().start_slot(slot)
            box["relay"] = TcpRelay(self.endpoint).start()
            direct, self.endpoint = self.endpoint, box["relay"].endpoint
            try:
                super().start_slot(slot)
            finally:
                self.endpoint = direct

    yield box, Relayed
    if "relay" in box:
        box["relay"].close()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory, relay):
    box, relayed = relay
    c = start_cluster(
        tiny_model_dir, tmp_path_factory.mktemp("control"), torchrun=False, cluster_type=relayed
    )
    c.relay = box["relay"]
    yield c
    c.stop()


def _log(cluster, name: str) -> str:
    with open(os.path.join(cluster.workdir, f"{name}.log"), errors="replace") as f:
        return f.read()


def test_the_standby_coordinator_takes_over_when_the_leader_dies_with_a_worker(
    cluster, tiny_model_dir
):
    assert cluster.opts.coordinators == 2, "eep launch starts a standby by default"
    identity = cluster.client.get(cluster.keys.coordinator).json()["identity"]
    name = "coordinator" if identity == "coordinator0" else identity  # coordinator<i>, i > 0
    leader, standby = (
        cluster.procs[name],
        next(p for n, p in cluster.procs.items() if n.startswith("coordinator") and n != name),
    )

    def kill_both(load):
        os.kill(leader.pid, signal.SIGKILL)
        fault = faults.inject(cluster, 1)  # with the leader gone, only the standby can act
        faults.wait_excluded(cluster, fault)
        faults.wait_requeued(cluster.url, fault)
        faults.wait_rejoined(cluster, fault)
        # the new leader may commit the exclusion and the rejoin as one view (the restarted
        # worker is ready by the time it is elected), so no token need flow in between:
        # prove the fault landed without that clause, and measure the stall instead
        faults.prove(fault, None, cluster.url)
        resumed = faults.wait_tokens_after(load, fault.at, timeout_s=120)
        print(f"leader + worker kill: first token {resumed - fault.at:.2f} s after the kill")
        return fault

    fault = load_with_faults(cluster, tiny_model_dir, kill_both)
    assert leader.wait(timeout=10) is not None
    assert fault.requeued >= 1
    assert standby.poll() is None
    new = cluster.client.get(cluster.keys.coordinator).json()["identity"]
    assert new != identity, "the standby never took the leadership"
    epochs = [v.epoch for v in cluster.history()]
    assert epochs == list(range(1, len(epochs) + 1)), f"epochs forked or skipped: {epochs}"


def _tokens(load) -> int:
    return sum(len(s.times) for s in load.snapshot())


def _steady(cluster) -> tuple[int, dict[int, int]]:
    """The committed epoch and every slot's worker pid (read while etcd answers)."""
    view = cluster.watcher.latest
    return view.epoch, {s: cluster.wait_worker_pid(s) for s in range(cluster.cfg.num_slots)}


def _events(cluster, name: str, after: float) -> list[dict]:
    path = os.path.join(cluster.workdir, f"events-{name}.jsonl")
    with open(path) as f:
        lines = [json.loads(line) for line in f.read().splitlines() if line.endswith("}")]
    return [e for e in lines if e["mono"] >= after]


def _serve_through_outage(cluster, tiny_model_dir, outage) -> dict:
    """Load, then ``outage()`` (returns when etcd is back): tokens must flow during it, and
    afterwards the view, the workers and every process are the same as before."""
    epoch, pids = _steady(cluster)
    front = cluster.procs["frontend"]
    seen: dict = {}

    def run(load):
        faults.wait_live_load(cluster.url, 0)
        seen["start"] = time.monotonic()
        seen["tokens"] = outage(load)
        # membership resumes with no manual step: every slot's record is back
        deadline = time.monotonic() + 60
        while len(cluster.client.get_prefix(cluster.keys.slots)[0]) < cluster.cfg.num_slots:
            assert time.monotonic() < deadline, "not every slot record came back"
            time.sleep(0.1)
        return seen

    load_with_faults(cluster, tiny_model_dir, run)
    assert seen["tokens"] > 0, "no token flowed during the outage"
    assert [v.epoch for v in cluster.history()][-1] == epoch, "the outage changed the view"
    assert _steady(cluster) == (epoch, pids), "a worker was restarted"
    assert front.poll() is None, "the front-end exited"
    for slot in range(cluster.cfg.num_slots):
        assert cluster.procs[f"slot{slot}"].poll() is None, f"slot {slot}'s supervisor exited"
        ended = [
            e
            for e in _events(cluster, f"supervisor{slot}", seen["start"])
            if e["event"] in ("session_lost", "worker_exited")
        ]
        assert not ended, f"slot {slot} ended an incarnation in the outage: {ended}"
    return seen


def test_ranks_serve_through_an_etcd_stall_and_re_attach_their_leases(cluster, tiny_model_dir):
    def stall(load):
        stalled = time.monotonic()
        os.kill(cluster.etcd_server.pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)
            before = _tokens(load)
            assert load.wait_tokens(before + 10, OUTAGE_S - 2), "tokens stopped in the stall"
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stalled)))
            return _tokens(load) - before
        finally:
            os.kill(cluster.etcd_server.pid, signal.SIGCONT)

    seen = _serve_through_outage(cluster, tiny_model_dir, stall)
    # the leases ran out on the server as it resumed: every slot re-attached its incarnation
    for slot in range(cluster.cfg.num_slots):
        deadline = time.monotonic() + 30
        while not [
            e
            for e in _events(cluster, f"supervisor{slot}", seen["start"])
            if e["event"] == "reattached"
        ]:
            assert time.monotonic() < deadline, f"slot {slot} never re-attached"
            time.sleep(0.1)


def test_ranks_serve_through_an_etcd_restart(cluster, tiny_model_dir):
    def restart(load):
        down = time.monotonic()
        cluster.etcd_server.stop()
        try:
            with pytest.raises(MembershipError):
                cluster.client.get(cluster.keys.view)  # etcd is really down
            before = _tokens(load)
            assert load.wait_tokens(before + 10, OUTAGE_S - 2), "tokens stopped while etcd was down"
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
            return _tokens(load) - before
        finally:
            cluster.etcd_server.start()

    _serve_through_outage(cluster, tiny_model_dir, restart)


def test_a_rank_cut_off_from_etcd_alone_is_excluded_and_emits_nothing_after(
    cluster, tiny_model_dir
):
    relay: TcpRelay = cluster.relay
    seen: dict = {}

    def partition(load):
        state = faults.wait_live_load(cluster.url, VICTIM)
        old = state["slots"][VICTIM]["incarnation"]
        pid = cluster.wait_worker_pid(VICTIM)
        relay.cut()
        cut_at = time.monotonic()
        excluded = cluster.watcher.wait_for(lambda v: v.incarnation(VICTIM) != old, 60)
        assert excluded is not None, "the coordinator never excluded the cut-off rank"
        # once the front-end serves the excluding view, nothing more from the victim counts
        deadline = time.monotonic() + 30
        while (front := faults.slots_state(cluster.url))["epoch"] < excluded.epoch:
            assert time.monotonic() < deadline, "the front-end never saw the exclusion"
            time.sleep(0.05)
        requeued = front["slots"][VICTIM]["requeued_from"] - state["slots"][VICTIM]["requeued_from"]
        assert requeued >= 1, "no request was on the victim when it was cut off"
        tokens_then = front["slots"][VICTIM]["tokens"]
        # the survivors serve on while the victim, alive and still cut off, is refused by the
        # epoch tags of the exchanges: it tried a step and threw it away
        assert load.wait_tokens(_tokens(load) + 40, 60), "the survivors did not serve on"
        deadline = time.monotonic() + 30
        while not [
            e
            for e in faults.worker_events(cluster, VICTIM, old)
            if e["event"] == "step_discarded" and e["mono"] >= cut_at
        ]:
            assert time.monotonic() < deadline, "the cut-off rank never tried a step"
            time.sleep(0.1)
        os.kill(pid, 0)  # alive all along: excluded, not dead
        after = faults.slots_state(cluster.url)
        assert after["slots"][VICTIM]["tokens"] == tokens_then, "a victim token was accepted"
        assert after["stale_accepted"] == 0
        seen.update(old=old, pid=pid, cut_s=time.monotonic() - cut_at)
        relay.heal()
        back = cluster.watcher.wait_for(lambda v: (v.incarnation(VICTIM) or 0) > old, 180)
        assert back is not None, "the victim never came back after the heal"
        faults.wait_gone(pid)
        return seen

    try:
        load_with_faults(cluster, tiny_model_dir, partition)
    finally:
        relay.heal()
    assert relay.held >= 1, "nothing of the victim's tried etcd while cut off"
    assert cluster.procs[f"slot{VICTIM}"].poll() is None
