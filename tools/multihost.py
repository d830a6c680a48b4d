"""A cluster whose ranks run on several hosts, the hosts being network namespaces.

:class:`MultiHostCluster` starts what an operator starts on real hosts, one ``eep launch`` per
host against one etcd (:mod:`eep.tools.netns`: one member per host):

- the first host (``head``) starts the cluster: its runtime config, the coordinators, the
  front-end (listening on that host's address) and its own slots;
- every other host runs ``eep launch --join`` with its own ``--host-slots``;
- every process of a host carries that host's ``--host-id`` and ``--address``; ranks on
  different hosts exchange tokens through the ``te`` fabric and pull weights and KV through
  the transfer engine, over the bridge between the namespaces.

The caller stays in the root namespace, which has no address on the hosts' network: it
reaches etcd and the front-end through relays listening on its loopback and connecting from
inside a host (:class:`eep.tools.relay.TcpRelay` with ``netns``). The object has the
attributes the fault tooling reads of a one-host :class:`eep.launcher.Cluster` (``url``,
``watcher``, ``client``, ``keys``, ``workdir``, ``wait_worker_pid``), so the same proofs
(:mod:`eep.tools.faults`) apply. Every host logs into the same ``workdir`` (the namespaces
share the filesystem), as the processes of one host do.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from eep.launcher import wait_worker_pid, worker_pid
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.watcher import ViewWatcher

from .common import new_cluster_name
from .netns import Hosts
from .netns_etcd import EtcdOnHosts, start_etcd
from .relay import TcpRelay

log = logging.getLogger(__name__)

HTTP_PORT = 8000  # the front-end's port on its host (each namespace has its own ports)


class MultiHostError(RuntimeError):
    """The cluster did not come up across the hosts; the message names the log to read."""


@dataclass(frozen=True)
class Layout:
    """Which slots each host runs: ``{host: (slot, ...)}``; the front-end and coordinators run
    on ``head``. Put the two replicas of an expert on different hosts (the default placement
    pairs slots ``s`` and ``s + 1``... see :func:`eep.placement.initial_placement`), or a
    whole host's loss orphans experts until it is back."""

    slots_by_host: dict[int, tuple[int, ...]]
    head: int = 0

    @property
    def num_slots(self) -> int:
        return sum(len(s) for s in self.slots_by_host.values())

    def host_of(self, slot: int) -> int:
        for host, slots in self.slots_by_host.items():
            if slot in slots:
                return host
        raise KeyError(f"slot {slot} runs on no host of {self.slots_by_host}")


class MultiHostCluster:
    def __init__(
        self,
        hosts: Hosts,
        model_dir: str,
        workdir: str,
        layout: Layout,
        ttl_s: int = 2,
        dtype: str = "float64",
        fabric: str = "te",
        standby: bool = True,
        extra_args: tuple[str, ...] = (),
    ):
        self.hosts, self.model_dir, self.workdir, self.layout = hosts, model_dir, workdir, layout
        self.ttl_s, self.dtype, self.fabric, self.standby = ttl_s, dtype, fabric, standby
        self.extra_args = extra_args
        self.name = new_cluster_name("mh")
        self.keys = Keys(self.name)
        self.launchers: dict[int, subprocess.Popen] = {}
        self.relays: list[TcpRelay] = []
        self.etcd: EtcdOnHosts | None = None
        self.url = ""

    # --- life ------------------------------------------------------------------------------

    def start(self, timeout_s: float = 300.0) -> MultiHostCluster:
        os.makedirs(self.workdir, exist_ok=True)
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        self.etcd = start_etcd(self.hosts, os.path.join(self.workdir, "etcd"))
        self.relays = [
            TcpRelay(self.etcd.members[i].endpoint, netns=self.hosts.ns(i)).start()
            for i in range(self.hosts.n)
        ]
        self.endpoint = ",".join(r.endpoint for r in self.relays)
        self.client = EtcdClient(self.endpoint)
        self.watcher = ViewWatcher(self.client, self.keys).start()
        deadline = time.monotonic() + timeout_s
        self.launchers[self.layout.head] = self._launch(self.layout.head, join=False)
        while self.client.get(self.keys.config) is None:  # the joiners read it
            self._check_alive(deadline, "the first host never wrote the runtime config")
            time.sleep(0.1)
        for host in self.layout.slots_by_host:
            if host != self.layout.head:
                self.launchers[host] = self._launch(host, join=True)
        everyone = set(range(self.layout.num_slots))
        while not self._view_has(everyone):
            self._check_alive(deadline, f"not every slot joined within {timeout_s:.0f} s")
            time.sleep(0.1)
        while (kv := self.client.get(self.keys.frontend)) is None:
            self._check_alive(deadline, "the front-end never registered")
            time.sleep(0.1)
        http = kv.json()["http"]
        head_ns = self.hosts.ns(self.layout.head)
        self.relays.append(TcpRelay(f"{http['host']}:{http['port']}", netns=head_ns).start())
        self.url = f"http://{self.relays[-1].endpoint}"
        log.info("multi-host cluster %s serving at %s (through a relay)", self.name, self.url)

    def _view_has(self, slots: set[int]) -> bool:
        view = self.watcher.latest
        return view is not None and slots <= set(view.members)

    def _check_alive(self, deadline: float, what: str) -> None:
        dead = {h: p.returncode for h, p in self.launchers.items() if p.poll() is not None}
        if dead or time.monotonic() > deadline:
            raise MultiHostError(
                f"cluster {self.name}: {what}; launchers exited: {dead}; logs in "
                f"{self.workdir} (launch-h<host>.log, and each process's own)"
            )

    def _launch(self, host: int, join: bool) -> subprocess.Popen:
        slots = ",".join(str(s) for s in self.layout.slots_by_host[host])
        argv = [
            sys.executable,
            "-m",
            "eep.tools.cli",
            "launch",
            "--model",
            self.model_dir,
            "--slots",
            str(self.layout.num_slots),
            "--fabric",
            self.fabric,
            "--dtype",
            self.dtype,
            "--ttl",
            str(self.ttl_s),
            "--etcd",
            self.etcd.endpoints,
            "--cluster",
            self.name,
            "--port",
            str(HTTP_PORT),
            "--host-slots",
            slots,
            "--host-id",
            self.host_id(host),
            "--address",
            self.hosts.addr(host),
            "--log-dir",
            self.workdir,
            *(["--join"] if join else []),
            *([] if self.standby else ["--no-standby"]),
            *self.extra_args,
        ]
        out = open(os.path.join(self.workdir, f"launch-h{host}.log"), "ab")  # noqa: SIM115
        try:
            return self.hosts.popen(host, argv, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()

    def host_id(self, host: int) -> str:
        return f"h{host}"

    def stop(self) -> None:
        for proc in self.launchers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # eep launch stops its cluster part
        for host, proc in self.launchers.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("host %d's eep launch did not stop; killing the host", host)
        if hasattr(self, "watcher"):
            self.watcher.stop()
        for host in range(self.hosts.n):
            self.hosts.kill_host(host)  # whatever is left, etcd included
        for relay in self.relays:
            relay.close()

    # --- what the fault tooling reads ------------------------------------------------------

    def worker_pid(self, slot: int) -> int | None:
        return worker_pid(self.client, self.keys, slot)

    def wait_worker_pid(self, slot: int, timeout_s: float = 60.0) -> int:
        return wait_worker_pid(self.client, self.keys, slot, timeout_s)

    # --- host faults -----------------------------------------------------------------------

    def kill_host(self, host: int) -> int:
        """SIGKILL every process of ``host``: its ranks, standbys, launcher, etcd member."""
        return self.hosts.kill_host(host)

    def restart_host(self, host: int, timeout_s: float = 60.0) -> None:
        """Bring a killed host back as an operator would: its etcd member, then ``eep launch
        --join`` for its slots (the head's front-end and coordinators are not restarted)."""
        self.etcd.start_member(host, timeout_s)
        self.launchers[host] = self._launch(host, join=True)
