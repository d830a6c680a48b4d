"""A TCP relay on loopback that can be cut: one process's path to etcd, partitioned alone.

Point one slot's ``--etcd`` at :attr:`TcpRelay.endpoint` and the relay forwards to the real
etcd. :meth:`cut` makes that path a partition for this process alone while every other
process still reaches etcd: open connections are closed, and new ones are accepted but
never forwarded (a request times out, as across a dead link, instead of being refused).
:meth:`heal` closes those held connections (a client reconnects) and forwards again.

``netns``: the relay listens here (on loopback) but reaches its target from inside that
network namespace (``ip netns`` name): how tests in the root namespace talk to the front-end
and etcd of "hosts" that are namespaces with no route out (``eep.tools.netns``). The
accepting thread enters the namespace before its first accept; the threads it starts, and
the sockets they open to the target, are in that namespace too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import socket
import threading

log = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the calling thread (alone) into network namespace ``name``."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:  # os.setns is Python 3.12+
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    finally:
        os.close(fd)


class TcpRelay:
    def __init__(self, target: str, host: str = "127.0.0.1", netns: str | None = None):
        tgt_host, _, tgt_port = target.rpartition(":")
        self.target = (tgt_host or "127.0.0.1", int(tgt_port))
        self._listener = socket.create_server((host, 0))
        self.endpoint = f"{host}:{self._listener.getsockname()[1]}"
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # every socket of a live pair, and held ones
        self.held = 0  # connections accepted while cut (never forwarded)
        self.netns = netns
        self._thread = threading.Thread(target=self._accept, name="relay", daemon=True)

    def start(self) -> TcpRelay:
        self._thread.start()
        return self

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def cut(self) -> None:
        """Partition: close what is open, hold what connects from now on."""
        self._cut.set()
        self._close_all()

    def heal(self) -> None:
        """Forward again; held connections are closed so their clients reconnect."""
        self._close_all()
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            socks, self._open = self._open, set()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        if self.netns:
            enter_netns(self.netns)  # the listener stays where it was made
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(conn)
            if self._cut.is_set():
                self.held += 1
                continue  # held: accepted, never answered
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError as exc:
            log.warning("relay: cannot reach %s: %s", self.target, exc)
            self._discard(client)
            return
        upstream.settimeout(None)
        with self._lock:
            if client not in self._open:  # cut meanwhile
                upstream.close()
                return
            self._open.add(upstream)
        peer = {client: upstream, upstream: client}
        sel = selectors.DefaultSelector()
        for sock in peer:
            sel.register(sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.5):
                    data = key.fileobj.recv(65536)
                    if not data or self._cut.is_set():
                        return
                    peer[key.fileobj].sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            self._discard(client, upstream)

    def _discard(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._open.discard(sock)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
