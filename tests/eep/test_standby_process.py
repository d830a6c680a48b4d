"""The warm standby process (eep.rank.standby) on its own: it warms, waits on its stdin, exits
quietly when released without a promotion, and a dead standby is never promoted. Real
processes, a real etcd (no cluster: nothing is promoted into a slot here)."""

from __future__ import annotations

import time

from eep.rank.standby import Standby


def _args(etcd_server, cluster: str) -> dict:
    return {"etcd": etcd_server.endpoint, "cluster": cluster, "slot": 0, "log_dir": None}


def _waiting(path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and b"waiting to be promoted" in path.read_bytes():
            return
        time.sleep(0.1)
    raise AssertionError(f"the standby never said it waits: {path.read_bytes()[-500:]!r}")


def test_a_released_standby_exits_quietly(etcd_server, cluster, tmp_path):
    standby = Standby(0, str(tmp_path))
    standby.ensure({**_args(etcd_server, cluster), "log_dir": str(tmp_path)})
    log = tmp_path / "worker0.standby1.log"
    _waiting(log)
    proc = standby.proc
    assert standby.alive and standby.rss_bytes() > 10 * 2**20  # torch is imported
    proc.stdin.close()  # the supervisor lets it go without a promotion
    assert proc.wait(timeout=30) == 0
    assert b"released without a promotion" in log.read_bytes()


def test_a_dead_standby_is_not_promoted_and_not_restarted_in_a_loop(etcd_server, cluster):
    standby = Standby(0, None)
    standby.ensure(_args(etcd_server, cluster))
    first = standby.proc
    first.kill()
    first.wait(timeout=30)
    assert standby.promote(7) is None, "a dead standby was promoted"
    standby.ensure(_args(etcd_server, cluster))  # after promote() there is none: start one
    second = standby.proc
    assert second is not None and second.pid != first.pid
    second.kill()
    second.wait(timeout=30)
    standby.ensure(_args(etcd_server, cluster))  # found dead: not replaced at once
    assert standby.proc is None
    standby.close()
