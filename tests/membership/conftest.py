"""Real processes for membership tests: member ranks and coordinators, killed by pid."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from eep.membership.keys import Keys
from eep.membership.watcher import ViewWatcher


class Procs:
    """Starts `eep` processes against one etcd and cluster; kills every one at teardown."""

    def __init__(self, endpoint: str, cluster: str, tmp_path):
        self.endpoint, self.cluster, self.tmp_path = endpoint, cluster, tmp_path
        self.started: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        out = open(self.tmp_path / f"{name}.log", "ab")  # noqa: SIM115 (kept for the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", *args, "--etcd", self.endpoint, "--cluster", self.cluster],
            stdout=subprocess.PIPE if name.startswith("member") else out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.started.append(proc)
        if proc.stdout is not None:
            proc.events = queue.Queue()  # type: ignore[attr-defined]
            threading.Thread(target=_pump, args=(proc,), daemon=True).start()
        return proc

    def member(self, slot: int, ttl: int = 2, write_every: float = 0.0) -> subprocess.Popen:
        args = ["eep.tools.member_proc", "--slot", str(slot), "--ttl", str(ttl)]
        if write_every:
            args += ["--write-every", str(write_every)]
        return self._spawn(args, f"member{slot}-{len(self.started)}")

    def coordinator(self, ttl: int = 2, identity: str = "") -> subprocess.Popen:
        args = ["eep.tools.cli", "coordinator", "--ttl", str(ttl), "--debounce", "0.05"]
        if identity:
            args += ["--identity", identity]
        return self._spawn(args, f"coordinator-{identity or len(self.started)}")

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                proc.kill()
            proc.wait(timeout=10)


def _pump(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        proc.events.put(json.loads(line))
    proc.events.put(None)


def read_event(proc: subprocess.Popen, want: str, timeout_s: float = 20.0) -> dict:
    """The next JSON event named ``want`` from a member process (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = proc.events.get(timeout=left)
        except queue.Empty:
            break
        if event is None:
            break
        if event["event"] == want:
            return event
    raise AssertionError(f"no {want!r} event from pid {proc.pid} within {timeout_s} s")


@pytest.fixture
def procs(etcd_server, cluster, tmp_path):
    p = Procs(etcd_server.endpoint, cluster, tmp_path)
    yield p
    p.kill_all()


@pytest.fixture
def watcher(etcd, cluster):
    w = ViewWatcher(etcd, Keys(cluster)).start()
    yield w
    w.stop()
