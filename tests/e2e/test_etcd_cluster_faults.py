"""A CPU cluster on a real 3-member etcd cluster, under live load, through the faults of the
etcd cluster itself: its leader killed (and restarted afterwards), a minority member stopped
for 5 s, and quorum taken away for 5 s. None of them is a membership event: every request
completes with the single-process result, tokens flow during and after each fault, no view is
committed, no worker is restarted, and the front-end and the supervisors stay the same
processes.

Quorum is taken away twice: with the two followers stopped, and with the leader and a
follower stopped. The second is the harder one: a stopped etcd leader that resumes after more
than the lease TTL revokes the leases it believes expired (etcd issue 15247, fixed after
3.4.23), so every slot's lease is gone however well the clients behave, and the supervisors
must re-attach their records (design.md 5.8) before the coordinator takes them for departures.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from eep.config import RuntimeConfig
from eep.launcher import Cluster, ClusterOptions
from eep.membership.server import EtcdCluster
from eep.model.config import ModelConfig
from eep.tools.common import new_cluster_name

from .conftest import DTYPE, load_with_faults

pytestmark = pytest.mark.slow

FAULT_S = 5.0  # how long a member (or two) stays stopped
TOKENS = 24  # tokens that must stream during a fault and after it


@pytest.fixture(scope="module")
def etcd_members():
    members = EtcdCluster(3).start()
    yield members
    members.cleanup()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory, etcd_members):
    cfg = RuntimeConfig.for_cluster(
        new_cluster_name("e2e"),
        tiny_model_dir,
        4,
        num_experts=ModelConfig.tiny().num_experts,
        dtype=DTYPE,
        ttl_s=2,
    )
    log_dir = str(tmp_path_factory.mktemp("etcd-cluster"))
    opts = ClusterOptions(cfg, etcd=etcd_members.endpoints, torchrun=False, log_dir=log_dir)
    c = Cluster(opts).start(timeout_s=180)
    yield c
    c.stop()


@dataclass(frozen=True)
class Undisturbed:
    """What no etcd fault may change: the committed epoch, the workers, the processes."""

    epoch: int
    worker_pids: dict[int, int | None]
    process_pids: dict[str, int]

    @classmethod
    def read(cls, cluster: Cluster) -> Undisturbed:
        return cls(
            epoch=cluster.history()[-1].epoch,
            worker_pids={s: cluster.worker_pid(s) for s in range(cluster.cfg.num_slots)},
            process_pids={name: proc.pid for name, proc in cluster.procs.items()},
        )


def _check_undisturbed(cluster: Cluster, before: Undisturbed, timeout_s: float = 30.0) -> None:
    # a slot whose lease etcd dropped is back once its supervisor re-attached the record; a
    # record present again, same incarnation, is one the coordinator keeps in the view
    deadline = time.monotonic() + timeout_s
    while None in (pids := [cluster.worker_pid(s) for s in range(cluster.cfg.num_slots)]):
        assert time.monotonic() < deadline, f"slot records missing: {pids}; {_fence_lines(cluster)}"
        time.sleep(0.1)
    after = Undisturbed.read(cluster)
    fenced = _fence_lines(cluster)
    assert after.epoch == before.epoch, f"a view was committed: {_epochs(cluster)}; {fenced}"
    assert after.worker_pids == before.worker_pids, f"workers were restarted; {fenced}"
    assert after.process_pids == before.process_pids, "a process was restarted"
    for name, proc in cluster.procs.items():
        assert proc.poll() is None, f"{name} exited with {proc.returncode}"


def _epochs(cluster: Cluster) -> list[tuple[int, tuple[int, ...], str]]:
    return [(v.epoch, v.members, v.reason) for v in cluster.history()]


def _fence_lines(cluster: Cluster) -> str:
    """The slot logs' lines on fencing, to tell a fence from any other disturbance."""
    lines = []
    for path in sorted(glob.glob(os.path.join(cluster.workdir, "slot*.log"))):
        with open(path, errors="replace") as f:
            lines += [
                f"{os.path.basename(path)}: {line.strip()}"
                for line in f
                if "fenced" in line or "not renewed in time" in line
            ]
    return "fence lines: " + (" | ".join(lines[-6:]) or "none")


def _streamed(load) -> int:
    return sum(len(s.times) for s in load.snapshot())


def _hold_stopped(
    etcd_members: EtcdCluster, stopped: list[int], load, landed: Callable[[], bool] | None = None
) -> int:
    """Stop ``stopped`` for ``FAULT_S`` (``landed`` must come true meanwhile); returns how many
    tokens streamed in that time."""
    before = _streamed(load)
    for idx in stopped:
        etcd_members.pause(idx)
    try:
        until = time.monotonic() + FAULT_S
        while landed is not None and not landed():
            assert time.monotonic() < until, "the fault never showed"
            time.sleep(0.05)
        assert load.wait_tokens(before + TOKENS, until - time.monotonic()), (
            "no tokens while members were stopped"
        )
        time.sleep(max(0.0, until - time.monotonic()))
        during = _streamed(load) - before
    finally:
        for idx in stopped:
            etcd_members.resume(idx)
    return during


def test_the_etcd_leader_killed_and_restarted_under_load(cluster, etcd_members, tiny_model_dir):
    before = Undisturbed.read(cluster)

    def kill_leader(load):
        old = etcd_members.wait_leader()
        etcd_members.kill(old)
        new = etcd_members.wait_leader(30, other_than=old)
        assert new != old, "the leader did not change"
        assert load.wait_tokens(_streamed(load) + TOKENS, 60), "no tokens after the leader died"
        etcd_members.restart(old)  # it rejoins as a follower and catches up
        assert load.wait_tokens(_streamed(load) + TOKENS, 60), "no tokens after the rejoin"
        return old, new

    old, new = load_with_faults(cluster, tiny_model_dir, kill_leader)
    print(f"etcd leader m{old} killed, m{new} elected, m{old} restarted")
    _check_undisturbed(cluster, before)


def test_a_stopped_etcd_follower_under_load(cluster, etcd_members, tiny_model_dir):
    before = Undisturbed.read(cluster)

    def stop_follower(load):
        leader = etcd_members.wait_leader()
        follower = next(i for i in range(3) if i != leader)
        during = _hold_stopped(etcd_members, [follower], load)
        assert load.wait_tokens(_streamed(load) + TOKENS, 60), "no tokens after the resume"
        return during

    during = load_with_faults(cluster, tiny_model_dir, stop_follower)
    print(f"one etcd follower stopped for {FAULT_S:.0f} s: {during} tokens streamed meanwhile")
    _check_undisturbed(cluster, before)


# With the leader stopped, etcd 3.4.23 revokes every lease as the leader resumes (issue 15247),
# sometimes just after a renewal through the new leader had succeeded: a supervisor takes a
# lease lost that soon after an outage for the outage's (and re-attaches), and a coordinator
# counts the failures it saw while campaigning towards its grace for vanished records.
LEADER_STOPPED = pytest.param(True, id="leader-and-follower")


@pytest.mark.parametrize("with_leader", [pytest.param(False, id="followers"), LEADER_STOPPED])
def test_etcd_quorum_lost_for_five_seconds_under_load(
    cluster, etcd_members, tiny_model_dir, with_leader
):
    """Ranks serve on through an etcd outage (design.md 5.8); a failure names the slots' fence
    lines, to tell a fence from any other disturbance."""
    before = Undisturbed.read(cluster)

    def _leaderless(idx: int) -> bool:
        status = etcd_members.status(idx)
        return status is not None and not int(status.get("leader", 0) or 0)

    def lose_quorum(load):
        leader = etcd_members.wait_leader()
        followers = [i for i in range(3) if i != leader]
        stopped = [leader, followers[0]] if with_leader else followers
        lone = next(i for i in range(3) if i not in stopped)
        # landed: the member left running names no leader (a lone leader steps down once it
        # misses its quorum, etcd's check-quorum)
        during = _hold_stopped(etcd_members, stopped, load, landed=lambda: _leaderless(lone))
        etcd_members.wait_leader(30)
        assert load.wait_tokens(_streamed(load) + TOKENS, 60), "no tokens after quorum returned"
        return during

    during = load_with_faults(cluster, tiny_model_dir, lose_quorum)
    what = "the leader and a follower" if with_leader else "both followers"
    print(f"etcd without quorum for {FAULT_S:.0f} s ({what} stopped): {during} tokens meanwhile")
    _check_undisturbed(cluster, before)
