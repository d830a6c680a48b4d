"""A local etcd server process: the launcher's embedded etcd, the tests' fixture, the benches'.

It listens on 127.0.0.1 only, on free ports unless told otherwise, with its own data dir, and
is stopped by pid. ``restart()`` keeps the data dir, so leases and keys survive it (etcd
persists leases; the new leader extends each one to its full TTL).
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


@dataclass
class EtcdServer:
    """One etcd member on 127.0.0.1. Use :meth:`start`, :meth:`stop`, :meth:`restart`."""

    data_dir: str | None = None
    client_port: int = 0
    peer_port: int = 0
    log_path: str | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _own_dir: bool = field(default=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 15.0) -> EtcdServer:
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="eep-etcd-")
            self._own_dir = True
        os.makedirs(self.data_dir, exist_ok=True)
        self.client_port = self.client_port or free_port()
        self.peer_port = self.peer_port or free_port()
        self.log_path = self.log_path or os.path.join(self.data_dir, "etcd.log")
        client_url = f"http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            find_etcd_binary(),
            "--name=eep",
            f"--data-dir={os.path.join(self.data_dir, 'member-data')}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=eep={peer_url}",
            "--initial-cluster-state=new",
            # one member: short ticks make start-up and leader election quick
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-level=warn",
        ]
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready(timeout_s)
        log.info("etcd up at %s (pid %d, data %s)", self.endpoint, self.pid, self.data_dir)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import requests  # etcd's health endpoint; imported here so the module stays light

        deadline = time.monotonic() + timeout_s
        url = f"http://{self.endpoint}/health"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EtcdUnavailable(
                    f"etcd exited with code {self._proc.returncode} at start; see {self.log_path}"
                )
            try:
                if requests.get(url, timeout=0.5).json().get("health") == "true":
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise EtcdUnavailable(f"etcd did not become healthy in {timeout_s} s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Stop the server by pid (SIGKILL after ``timeout_s``); the data dir is kept."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
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
