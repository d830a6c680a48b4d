"""A slot supervisor outlives etcd being away: it retries with backoff, never exits, and
never spends its restart budget on the outage (issue: control-plane faults).

A real supervisor (``python -m eep.rank``) against a real etcd that is stopped and restarted
on the same ports and data. The runtime config names no model, so each worker it starts
exits at once: the point here is the supervisor, which must register the slot again once
etcd is back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.registry import read_slots
from eep.membership.server import EtcdServer


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _registered(client: EtcdClient, keys: Keys):
    try:
        return read_slots(client, keys)[0].get(0)
    except Exception:  # etcd still coming up
        return None


def test_a_supervisor_waits_out_etcd_down_at_start_and_mid_run(tmp_path):
    server = EtcdServer(data_dir=str(tmp_path / "etcd"))
    server.start()
    endpoint, cluster = server.endpoint, "sup-etcd"
    keys = Keys(cluster)
    log = open(tmp_path / "supervisor.log", "ab")  # noqa: SIM115 (the child's)
    server.stop()  # down before the supervisor starts
    proc = subprocess.Popen(
        [sys.executable, "-m", "eep.rank", "--etcd", endpoint, "--cluster", cluster]
        + ["--slot", "0", "--ttl", "2", "--max-restarts", "1000", "--etcd-timeout", "0.5"],
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        # several backoff rounds with etcd away: the supervisor must still be there
        _wait(
            lambda: b"opening a session" in (tmp_path / "supervisor.log").read_bytes(),
            60,
            "the supervisor to report etcd away",
        )
        time.sleep(3)
        assert proc.poll() is None, "the supervisor exited while etcd was down"
        server.start()
        client = EtcdClient(endpoint)
        first = _wait(lambda: _registered(client, keys), 60, "the slot registered")
        # mid-run: etcd away for longer than the TTL, then back on the same data
        server.stop()
        time.sleep(4)
        assert proc.poll() is None, "the supervisor exited during a mid-run etcd outage"
        server.start()
        again = _wait(
            lambda: (r := _registered(client, keys)) and r.incarnation > first.incarnation and r,
            60,
            "the slot registered again after the outage",
        )
        assert proc.poll() is None
        assert again.slot == 0
    finally:
        proc.kill()
        proc.wait(timeout=10)
        server.cleanup()
