"""An etcd cluster across the hosts of :class:`eep.tools.netns.Hosts`: one member per host."""

from __future__ import annotations

import functools
import os
import signal
import time

from eep.membership.errors import EtcdUnavailable
from eep.membership.server import EtcdCluster, EtcdServer

from .netns import ETCD_CLIENT_PORT, ETCD_PEER_PORT, Hosts


class EtcdOnHosts(EtcdCluster):
    """:class:`EtcdCluster` (faults, leader queries, etcd flags) of a member in each host, on its
    address only (ports 2379 and 2380), data in ``data_root/h<i>``: run by ``ip netns exec``,
    probed from inside the host, stopped by pid; started again, it rejoins from its data."""

    def __init__(self, hosts: Hosts, data_root: str):
        self.hosts = hosts
        members = [
            EtcdServer(os.path.join(data_root, f"h{i}"), ETCD_CLIENT_PORT, ETCD_PEER_PORT)
            for i in range(hosts.n)
        ]
        for i, member in enumerate(members):
            member.name, member.host = f"h{i}", hosts.addr(i)
            member.prefix = ("ip", "netns", "exec", hosts.ns(i))
            member.net_call = functools.partial(hosts.call, i)
        super().__init__(base_dir=data_root, members=members)

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Wait until every member that runs answers ``/health`` true."""
        deadline = time.monotonic() + timeout_s
        todo = [i for i, m in enumerate(self.members) if m.pid is not None]
        while todo := [i for i in todo if not self.members[i].healthy()]:
            if time.monotonic() > deadline:
                logs = ", ".join(str(self.members[i].log_path) for i in todo)
                raise EtcdUnavailable(f"etcd on hosts {todo} unhealthy after {timeout_s} s: {logs}")
            time.sleep(0.05)

    def stop_member(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Stop host ``i``'s member by pid (SIGKILL after 10 s); its data dir stays."""
        self.paused.discard(i)
        self.members[i].stop(sig)

    def start_member(self, i: int, timeout_s: float = 30.0) -> None:
        """Start host ``i``'s member again on its data dir; wait until it is healthy."""
        self.restart(i, timeout_s)

    def stop_all(self) -> None:
        """SIGKILL every member; the data dirs stay."""
        self.cleanup()


def start_etcd(hosts: Hosts, data_root: str, timeout_s: float = 30.0) -> EtcdOnHosts:
    """An etcd cluster of one member per host, started and healthy."""
    return EtcdOnHosts(hosts, data_root).start(timeout_s)
