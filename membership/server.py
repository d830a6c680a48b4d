"""Local etcd processes: the launcher's embedded etcd, the tests' fixtures, the benches'.

:class:`EtcdServer` is one member; :class:`EtcdCluster` is several members of one cluster (the
tests' 3-member cluster, whose members are killed, restarted and stopped under load). Both
listen on 127.0.0.1 only, on free ports unless told otherwise, with their own data dirs, and
are stopped by pid. A restart keeps the data dir, so leases and keys survive it (etcd persists
leases; the new leader extends each one to its full TTL).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import EtcdUnavailable

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_etcd_binary() -> str:
    path = os.environ.get("EEP_ETCD_BIN") or shutil.which("etcd")
    if not path:
        raise EtcdUnavailable(
            "no etcd binary found: install it (`apt-get install etcd-server`, or run "
            "`make setup`) or set EEP_ETCD_BIN to its path."
        )
    return path


# Raft timings for members on one loopback host. A heartbeat every 50 ms costs nothing here,
# and an election timeout of 500 ms (ten heartbeats missed) lets a killed leader be
# replaced within about a second: well inside the sessions' lease TTL (2-3 s), whose renewals
# fail while there is no leader. Much shorter and a starved 2-core host (a CPU cluster decoding
# beside etcd) would see elections nobody caused.
HEARTBEAT_MS, ELECTION_MS = 50, 500


@dataclass
class EtcdServer:
    """One etcd member, on 127.0.0.1 by default. Use :meth:`start`, :meth:`stop`, :meth:`restart`.

    Alone by default; a member of a cluster gets its ``name`` and ``initial_cluster`` (every
    member's ``name=peer URL``, see :class:`EtcdCluster`). A member on another host (a network
    namespace, ``eep.tools.netns``) gets the ``host`` address it listens on and advertises, a
    ``prefix`` its command runs under (``ip netns exec NS``, which execs etcd in place: the pid
    stays etcd's) and ``net_call``, which runs the health probe in that host's network."""

    data_dir: str | None = None
    client_port: int = 0
    peer_port: int = 0
    log_path: str | None = None
    name: str = "eep"
    initial_cluster: str | None = None  # None: this member alone
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()
    net_call: Callable[[Callable[[], bool]], bool] | None = field(default=None, repr=False)
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _own_dir: bool = field(default=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 15.0) -> EtcdServer:
        self.spawn()
        self.wait_ready(timeout_s)
        return self

    def spawn(self) -> None:
        """Start the process without waiting for it to serve: the members of a new cluster
        must all run before any of them has a leader and answers ``/health``."""
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="eep-etcd-")
            self._own_dir = True
        os.makedirs(self.data_dir, exist_ok=True)
        self.client_port = self.client_port or free_port()
        self.peer_port = self.peer_port or free_port()
        self.log_path = self.log_path or os.path.join(self.data_dir, "etcd.log")
        client_url = f"http://{self.endpoint}"
        cmd = [
            *self.prefix,
            find_etcd_binary(),
            f"--name={self.name}",
            f"--data-dir={os.path.join(self.data_dir, 'member-data')}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            # ignored once the data dir holds a member: a restart rejoins as itself
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            "--initial-cluster-state=new",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            "--logger=zap",
            "--log-level=warn",
        ]
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )

    def healthy(self, timeout_s: float = 0.5) -> bool:
        """Whether the member answers ``/health`` true (it has a leader and serves reads)."""
        import requests  # etcd's health endpoint; imported here so the module stays light

        def probe() -> bool:
            resp = requests.get(f"http://{self.endpoint}/health", timeout=timeout_s)
            return resp.json().get("health") == "true"

        try:
            return bool(self.net_call(probe) if self.net_call else probe())
        except (requests.RequestException, ValueError):
            return False

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Wait until the member reports itself healthy (it has a leader and serves reads)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EtcdUnavailable(
                    f"etcd exited with code {self._proc.returncode} at start; see {self.log_path}"
                )
            if self.healthy():
                log.info("etcd %s up at %s (pid %d)", self.name, self.endpoint, self.pid)
                return
            time.sleep(0.05)
        self.stop()
        raise EtcdUnavailable(f"etcd did not become healthy in {timeout_s} s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Stop the server by pid (SIGKILL after ``timeout_s``); the data dir is kept."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        if sig != signal.SIGKILL:
            os.kill(proc.pid, signal.SIGCONT)  # a stopped member acts on SIGTERM only when woken
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, optionally stay down for ``down_s``, and start on the same ports and data."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def cleanup(self) -> None:
        self.stop(signal.SIGKILL)
        if self._own_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class EtcdCluster:
    """``size`` etcd members of one new cluster on 127.0.0.1, each on its own free ports with
    its own data dir under one temp dir, started together and stopped by pid.

    Faults by member index: :meth:`kill` (SIGKILL) and :meth:`restart` (same ports and data
    dir: it rejoins as itself and catches up from the leader), :meth:`pause` and
    :meth:`resume` (SIGSTOP/SIGCONT: a member that accepts connections but never answers).
    ``members`` replaces the ``size`` members on 127.0.0.1 with the caller's (on other hosts:
    ``eep.tools.netns``); their ``initial_cluster`` is set here.
    """

    def __init__(
        self, size: int = 3, base_dir: str | None = None, members: list[EtcdServer] | None = None
    ):
        size = len(members) if members else size
        if size < 1:
            raise ValueError(f"an etcd cluster needs at least 1 member, got {size}.")
        self._own_dir = base_dir is None
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="eep-etcd-cluster-")
        self.members = members or [
            EtcdServer(
                data_dir=os.path.join(self.base_dir, f"m{i}"),
                client_port=free_port(),
                peer_port=free_port(),
                name=f"m{i}",
            )
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial
        self.paused: set[int] = set()

    @property
    def endpoints(self) -> str:
        """Every member's client endpoint, comma-separated: what ``EtcdClient`` and ``--etcd``
        take."""
        return ",".join(m.endpoint for m in self.members)

    def start(self, timeout_s: float = 30.0) -> EtcdCluster:
        for member in self.members:
            member.spawn()
        deadline = time.monotonic() + timeout_s
        try:
            for member in self.members:
                member.wait_ready(max(0.1, deadline - time.monotonic()))
        except EtcdUnavailable:
            self.cleanup()
            raise
        return self

    # --- faults ----------------------------------------------------------------------------

    def kill(self, idx: int) -> None:
        """SIGKILL member ``idx`` (a paused one too); its data dir stays for :meth:`restart`."""
        self.paused.discard(idx)
        self.members[idx].stop(signal.SIGKILL)

    def restart(self, idx: int, timeout_s: float = 30.0) -> None:
        """Start member ``idx`` again on its ports and data dir; wait until it serves."""
        self.kill(idx)
        self.members[idx].start(timeout_s)

    def pause(self, idx: int) -> None:
        self._signal(idx, signal.SIGSTOP)
        self.paused.add(idx)

    def resume(self, idx: int) -> None:
        self._signal(idx, signal.SIGCONT)
        self.paused.discard(idx)

    def _signal(self, idx: int, sig: int) -> None:
        pid = self.members[idx].pid
        if pid is None:
            raise ValueError(f"etcd member {idx} is not running.")
        os.kill(pid, sig)

    # --- leadership ------------------------------------------------------------------------

    def status(self, idx: int, timeout_s: float = 0.5) -> dict | None:
        """Member ``idx``'s ``/v3/maintenance/status`` (``None``: down, paused or silent)."""
        import requests

        if self.members[idx].pid is None or idx in self.paused:
            return None
        url = f"http://{self.members[idx].endpoint}/v3/maintenance/status"
        post = lambda: requests.post(url, json={}, timeout=timeout_s).json()
        try:
            net_call = self.members[idx].net_call
            return net_call(post) if net_call else post()
        except (requests.RequestException, ValueError):
            return None

    def leader(self) -> int | None:
        """The index of the member that leads now, as the members that answer see it: one that
        names itself leader and that no answering member contradicts (``None`` otherwise)."""
        statuses = {i: s for i in range(len(self.members)) if (s := self.status(i)) is not None}
        ids = {int(s["header"]["member_id"]): i for i, s in statuses.items()}
        leaders = {int(s.get("leader", 0)) for s in statuses.values()}
        if len(leaders) != 1:
            return None
        return ids.get(leaders.pop())

    def wait_leader(self, timeout_s: float = 15.0, other_than: int | None = None) -> int:
        """Wait for a leader (other than member ``other_than``) that every answering member
        agrees on; returns its index."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            idx = self.leader()
            if idx is not None and idx != other_than:
                return idx
            time.sleep(0.05)
        raise EtcdUnavailable(
            f"no etcd leader{'' if other_than is None else f' other than member {other_than}'} "
            f"within {timeout_s} s; see the members' logs under {self.base_dir}"
        )

    # --- teardown --------------------------------------------------------------------------

    def cleanup(self) -> None:
        for idx in range(len(self.members)):
            self.kill(idx)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
