"""Real holder processes for the transfer tests: Mooncake over loopback TCP, killed by pid."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from eep.tools.holder_proc import SourceSpec, serve
from eep.transfer.config import TransferConfig

READY_TIMEOUT_S = 60.0


def tcp_config(**kw) -> TransferConfig:
    """Loopback TCP; short deadlines so failure tests finish quickly."""
    base = dict(
        protocol="tcp",
        hostname="127.0.0.1",
        host_id="testhost",
        connect_timeout_s=1.0,
        op_timeout_s=2.0,
        pull_timeout_s=60.0,
        engine_timeout_s=5,
        chunk_nbytes=4 << 20,
        max_inflight=4,
    )
    base.update(kw)
    return TransferConfig(**base)


class Holder:
    """One holder process and the parent's end of its pipe."""

    def __init__(self, proc: mp.Process, conn, holder: str) -> None:
        self.proc, self.conn, self.holder = proc, conn, holder
        self.pid = proc.pid

    def call(self, *cmd, timeout_s: float = 30.0):
        self.conn.send(cmd)
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"holder {self.holder} did not answer {cmd[0]} in {timeout_s} s")
        status, *rest = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"holder {self.holder}: {rest}")
        return rest[0] if rest else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.is_alive():
            os.kill(self.pid, sig)


class Holders:
    """Starts holder processes against one etcd and cluster; kills every one at teardown."""

    def __init__(self, endpoint: str, cluster: str) -> None:
        self.endpoint, self.cluster = endpoint, cluster
        self.ctx = mp.get_context("spawn")
        self.started: list[Holder] = []

    def start(self, holder: str, tensors, **kw) -> Holder:
        kw.setdefault("config", tcp_config())
        spec = SourceSpec(self.endpoint, self.cluster, holder, tensors=tuple(tensors), **kw)
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=serve, args=(spec, child), daemon=True)
        proc.start()
        child.close()
        h = Holder(proc, parent, holder)
        self.started.append(h)
        return h

    def wait_ready(self, *holders: Holder) -> None:
        for h in holders:
            if not h.conn.poll(READY_TIMEOUT_S):
                raise TimeoutError(f"holder {h.holder} not ready in {READY_TIMEOUT_S} s")
            msg = h.conn.recv()
            assert msg[0] == "ready", msg

    def close(self) -> None:
        for h in self.started:
            h.kill(signal.SIGKILL)
            h.proc.join(10)


@pytest.fixture
def holders(etcd_server, cluster):
    hs = Holders(etcd_server.endpoint, cluster)
    yield hs
    hs.close()


@pytest.fixture(scope="module")
def transport():
    """This test process's own engine (one per module; Mooncake engines are heavy)."""
    from eep.transfer.engine import start_transport

    tr = start_transport(tcp_config())
    yield tr
    tr.close()
