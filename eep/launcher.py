"""Starting and stopping a whole cluster on this host (``eep launch``, the demo, the tests), or
this host's part of a cluster on several hosts (``ClusterOptions.slots``, ``join``, ``host_id``,
``address``: the first host starts the cluster, the others join it; design.md 5.9).

Processes: an etcd (embedded unless one is given), the coordinator, the front-end, and one
torchrun agent per slot (``--nproc-per-node 1 --max-restarts N``) running the slot supervisor,
so a crash restarts that slot alone. Everything is stopped by pid.

``baseline=True`` starts the full-restart baseline instead: one torchrun agent over every slot
(``--nproc-per-node <slots>``, slot = ``LOCAL_RANK``) whose supervisors exit when their worker
ends, so one dead worker makes torchrun tear down and restart every local slot, each reloading
its weights from disk. Membership still goes through etcd, so clients see the same API.

Each cluster gets a secret (``<workdir>/secret``, mode 0600, unless the runtime config names a
file already) that the front-end challenges every rank link to prove (``eep.auth``).

Once the cluster is up, a supervision thread restarts the front-end and the coordinators
whenever one exits while the cluster is not stopping (a slot's supervisor is torchrun's, or the
supervisor's own, business). The front-end is restarted on the same HTTP port, picked once
when none was asked for, so clients retry the same URL.

Nothing listens beyond 127.0.0.1 unless asked: etcd, the front-end (``ClusterOptions.host``),
the torchrun agents' stores (``eep.torchrun``, ``--local-addr 127.0.0.1``) and the nccl
fabric's store do; NCCL's and gloo's own sockets use the loopback interface unless
``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME`` say otherwise. The README's "Listening sockets"
lists every port and the one exception (Mooncake's, on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from eep.auth import SecretError, create_secret, load_secret
from eep.cluster_options import ClusterOptions
from eep.config import RuntimeConfig
from eep.fabrics.shm import remove_segments
from eep.membership.commit import read_history
from eep.membership.etcd import EtcdClient
from eep.membership.host import ENV_HOST_ADDR, ENV_HOST_ID
from eep.membership.keys import Keys
from eep.membership.server import EtcdServer, free_port
from eep.membership.watcher import ViewWatcher
from eep.rank.status import status_path

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The cluster did not come up; the message names the log to read."""


WATCH_EVERY_S = 0.05  # how often the supervision thread polls the processes it restarts
QUICK_EXIT_S = 10.0  # a process that exits sooner than this after its start died "at once"
BACKOFF_S = (0.5, 10.0)  # first and longest wait before restarting one that keeps dying at once


def restart_delay(name: str, quick_exits: int, ttl_s: float) -> float:
    """Seconds to wait before restarting process ``name`` after its ``quick_exits``-th exit in
    a row that came soon after its start (0: it had been running a while).

    A front-end is restarted at once (clients wait for it); one that keeps dying at once is
    backed off, doubling, so a broken configuration is not a hot loop. A coordinator waits one
    TTL more: by then the dead one's election key has expired and a live standby, already
    campaigning, leads, so the restarted one rejoins as a standby and leadership does not
    bounce back to it."""
    first, longest = BACKOFF_S
    backoff = 0.0 if quick_exits <= 1 else min(longest, first * 2 ** (quick_exits - 2))
    if name.startswith("coordinator"):
        return max(backoff, ttl_s + 1.0)
    return backoff


def worker_pid(client: EtcdClient, keys: Keys, slot: int) -> int | None:
    """The pid in ``slot``'s record (``None``: no record, a restarting slot)."""
    kv = client.get(keys.slot(slot))
    return json.loads(kv.value)["endpoints"].get("pid") if kv else None


def wait_worker_pid(client: EtcdClient, keys: Keys, slot: int, timeout_s: float = 60.0) -> int:
    """The pid of ``slot``'s worker once it is ready (a restarting slot has none yet)."""
    deadline = time.monotonic() + timeout_s
    while (pid := worker_pid(client, keys, slot)) is None:
        if time.monotonic() > deadline:
            raise LaunchError(f"slot {slot} has no ready worker after {timeout_s} s")
        time.sleep(0.05)
    return pid


@dataclass
class Cluster:
    opts: ClusterOptions
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    etcd_server: EtcdServer | None = None
    workdir: str = ""
    url: str = ""
    restarts: dict[str, int] = field(default_factory=dict)  # name -> times restarted
    _specs: dict[str, tuple] = field(default_factory=dict, repr=False)  # name -> _spawn args
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _watch: threading.Thread | None = field(default=None, repr=False)

    @property
    def cfg(self) -> RuntimeConfig:
        return self.opts.runtime

    @property
    def local_slots(self) -> tuple[int, ...]:
        """The slots this host runs."""
        slots = self.opts.slots
        return tuple(range(self.cfg.num_slots)) if slots is None else tuple(slots)

    def _host_env(self) -> dict[str, str]:
        """The identity every process of this host inherits (``eep.membership.host``)."""
        env = {}
        if self.opts.host_id:
            env[ENV_HOST_ID] = self.opts.host_id
        if self.opts.address:
            env[ENV_HOST_ADDR] = self.opts.address
        return env

    def start(self, timeout_s: float = 120.0) -> Cluster:
        self.workdir = self.opts.log_dir or tempfile.mkdtemp(prefix="eep-cluster-")
        os.makedirs(self.workdir, exist_ok=True)
        self._make_secret()
        if self.opts.etcd is None:
            self.etcd_server = EtcdServer(data_dir=os.path.join(self.workdir, "etcd")).start()
        self.endpoint = self.opts.etcd or self.etcd_server.endpoint
        self.client, self.keys = EtcdClient(self.endpoint), Keys(self.cfg.cluster)
        if self.opts.join:
            self._join()
            return self
        if self.cfg.fabric == "nccl" and not self.cfg.fabric_store:
            # the nccl fabric's process group rendezvous at a TCP store that slot 0 hosts
            store = f"127.0.0.1:{free_port()}"
            self.opts.runtime = dataclasses.replace(self.cfg, fabric_store=store)
        self.client.delete(self.keys.prefix, prefix=True)  # a fresh cluster: no stale views
        self.client.put(self.keys.config, self.cfg.to_json())
        for slot in self.local_slots:
            remove_segments(self.cfg.cluster, slot)
        self.watcher = ViewWatcher(self.client, self.keys).start()
        for i in range(self.opts.coordinators):
            # one leader, the rest standbys that win the election when it dies
            self._spawn(
                "coordinator" if i == 0 else f"coordinator{i}",
                "eep.tools.cli",
                "coordinator",
                "--ttl",
                str(self.cfg.ttl_s),
                "--planner",
                "eep.planner:from_cluster",
                "--initial-members",
                str(self.cfg.num_slots),
                "--identity",
                f"coordinator{i}",
            )
        # one port for every front-end of this cluster: a restarted one listens where its
        # predecessor did, so clients retry the same URL
        self.http_port = self.opts.http_port or free_port()
        self._spawn(
            "frontend",
            "eep.tools.cli",
            "frontend",
            "--host",
            self.opts.host,
            "--port",
            str(self.http_port),
        )
        if self.opts.baseline:
            self.start_baseline()
        else:
            for slot in self.local_slots:
                self.start_slot(slot)
        self.wait_ready(timeout_s)
        self._watch = threading.Thread(target=self._supervise, name="cluster-watch", daemon=True)
        self._watch.start()
        return self

    def _join(self, timeout_s: float = 120.0) -> None:
        """Join the cluster another host started: its runtime config from etcd (``--cluster``
        names it), then this host's slots alone."""
        kv = self.client.get(self.keys.config)
        if kv is None:
            raise LaunchError(
                f"cluster {self.cfg.cluster}: no runtime config at {self.keys.config} in etcd "
                f"{self.endpoint}; start the first host (without --join) before the others."
            )
        self.opts.runtime = RuntimeConfig.from_json(kv.value)
        outside = [s for s in self.local_slots if not 0 <= s < self.cfg.num_slots]
        if outside:
            raise LaunchError(
                f"cluster {self.cfg.cluster} has {self.cfg.num_slots} slots; this host was "
                f"asked for slots {outside} outside them."
            )
        if self.cfg.secret_file and not os.path.exists(self.cfg.secret_file):
            raise LaunchError(
                f"cluster {self.cfg.cluster}: the cluster's secret {self.cfg.secret_file} is "
                "not on this host: copy it there (mode 0600) before joining."
            )
        for slot in self.local_slots:
            remove_segments(self.cfg.cluster, slot)
        self.watcher = ViewWatcher(self.client, self.keys).start()
        for slot in self.local_slots:
            self.start_slot(slot)
        self.wait_ready(timeout_s)

    def _make_secret(self) -> None:
        """The secret rank links prove they know: a fresh one in the workdir unless the runtime
        config names a file (which must then be readable by this user alone)."""
        if self.opts.join:
            return  # the first host made it; _join checks it is here
        if self.cfg.secret_file:
            try:
                load_secret(self.cfg.secret_file)
            except SecretError as exc:
                raise LaunchError(f"cluster {self.cfg.cluster}: {exc}") from None
            return
        path = os.path.join(self.workdir, "secret")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a reused log dir: a new cluster gets a new secret
        create_secret(path)
        self.opts.runtime = dataclasses.replace(self.cfg, secret_file=path)

    def _spawn(self, name: str, module: str, *args: str, prefix: list[str] | None = None):
        self._specs[name] = (module, args, prefix)
        cmd = [
            *(prefix or [sys.executable, "-m"]),
            module,
            *args,
            "--etcd",
            self.endpoint,
            "--cluster",
            self.cfg.cluster,
        ]
        # NCCL's and gloo's bootstrap and data sockets: the loopback interface, as everything
        # of this one-host cluster, unless the environment names another
        env = {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo", **os.environ}
        env.update(self._host_env())
        # appended to: a restarted process writes on after its predecessor's last words
        with open(os.path.join(self.workdir, f"{name}.log"), "ab") as out:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        return self.procs[name]

    def _supervise(self) -> None:
        """Restart the front-end and the coordinators whenever one exits, until :meth:`stop`
        (see :func:`restart_delay` for when)."""
        names = [n for n in self.procs if n == "frontend" or n.startswith("coordinator")]
        started = dict.fromkeys(names, time.monotonic())
        quick = dict.fromkeys(names, 0)  # exits in a row soon after a start
        due: dict[str, float] = {}  # name -> when to restart it
        while not self._stopping.wait(WATCH_EVERY_S):
            now = time.monotonic()
            for name in names:
                proc = self.procs[name]
                if name not in due:
                    if proc.poll() is None:
                        continue
                    quick[name] = quick[name] + 1 if now - started[name] < QUICK_EXIT_S else 0
                    delay = restart_delay(name, quick[name], self.cfg.ttl_s)
                    log.warning(
                        "cluster %s: %s (pid %d) exited with %s after %.1f s; restarting it "
                        "in %.1f s",
                        self.cfg.cluster,
                        name,
                        proc.pid,
                        proc.returncode,
                        now - started[name],
                        delay,
                    )
                    due[name] = now + delay
                if now >= due[name] and not self._stopping.is_set():
                    del due[name]
                    self._restart(name)
                    started[name] = time.monotonic()

    def _restart(self, name: str) -> None:
        module, args, prefix = self._specs[name]
        proc = self._spawn(name, module, *args, prefix=prefix)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        log.warning(
            "cluster %s: restarted %s as pid %d (restart %d)",
            self.cfg.cluster,
            name,
            proc.pid,
            self.restarts[name],
        )

    def _torchrun(self, nproc: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "eep.torchrun",  # torchrun, its stores listening on --local-addr alone
            "--nproc-per-node",
            str(nproc),
            "--max-restarts",
            str(self.opts.max_restarts),
            "--standalone",
            "--local-addr",
            self.opts.address or "127.0.0.1",
            "--monitor-interval",
            "0.5",
            "-m",
        ]

    def start_slot(self, slot: int) -> None:
        assert not self.opts.baseline, "baseline slots are started together by start_baseline"
        args = ["--slot", str(slot), "--ttl", str(self.cfg.ttl_s), "--log-dir", self.workdir]
        if not self.opts.standby:
            args.append("--no-standby")
        if self.opts.torchrun:
            self._spawn(f"slot{slot}", "eep.rank", *args, prefix=self._torchrun(1))
        else:
            self._spawn(f"slot{slot}", "eep.rank", *args)

    def start_baseline(self) -> None:
        """One torchrun agent over every slot; each supervisor takes its slot from LOCAL_RANK
        and exits when its worker ends, so torchrun restarts all of them."""
        args = ["--baseline", "--ttl", str(self.cfg.ttl_s), "--log-dir", self.workdir]
        self._spawn("slots", "eep.rank", *args, prefix=self._torchrun(self.cfg.num_slots))

    def wait_ready(self, timeout_s: float) -> None:
        """Until this host's slots are in the view and the front-end answers (the first host
        of several: the first view waits for every slot, so for every host)."""
        mine = set(self.local_slots)
        full = self.watcher.wait_for(lambda v: mine <= set(v.members), timeout_s)
        if full is None:
            self._fail(f"slots {sorted(mine)} did not all join within {timeout_s} s")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kv = self.client.get(self.keys.frontend)
            if kv is not None:
                http = kv.json()["http"]
                self.url = f"http://{http['host']}:{http['port']}"
                return
            time.sleep(0.1)
        self._fail("the front-end did not register")

    def _fail(self, what: str) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        self.stop()
        raise LaunchError(
            f"cluster {self.cfg.cluster}: {what}; exited: {dead}; logs in {self.workdir}"
        )

    def history(self):
        """Every committed view of the cluster, in epoch order."""
        return read_history(self.client, self.keys)

    def wait_worker_pid(self, slot: int, timeout_s: float = 60.0) -> int:
        return wait_worker_pid(self.client, self.keys, slot, timeout_s)

    def worker_pid(self, slot: int) -> int | None:
        return worker_pid(self.client, self.keys, slot)

    def stop(self) -> None:
        self._stopping.set()  # first: nothing may restart what is being stopped
        if self._watch is not None:
            self._watch.join(timeout=30)
        if hasattr(self, "watcher"):
            self.watcher.stop()
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM; killing it", name)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self.etcd_server is not None:
            self.etcd_server.stop()
        for slot in self.local_slots:
            remove_segments(self.cfg.cluster, slot)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(status_path(self.cfg.cluster, slot))

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
