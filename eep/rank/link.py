"""The worker's link to the front-end: typed messages in (a queue), tokens and replies out.

The link finds the front-end's rank port in etcd, says :class:`~eep.protocol.Hello` as this
``(slot, incarnation)``, and reconnects whenever the connection or etcd fails; a worker never
dies of its link.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time

from eep.engine.engine import TokenEvent
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.protocol import Hello, Message, ToFrontend, Tokens, encode, recv_message

log = logging.getLogger("eep.rank.link")


class FrontendLink:
    def __init__(self, client: EtcdClient, keys: Keys, slot: int, incarnation: int):
        self.client, self.keys, self.slot, self.incarnation = client, keys, slot, incarnation
        self.inbox: queue.Queue[Message] = queue.Queue()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.connected = threading.Event()
        threading.Thread(target=self._run, name="frontend-link", daemon=True).start()

    def _address(self) -> tuple[str, int] | None:
        kv = self.client.get(self.keys.frontend)
        if kv is None:
            return None
        addr = kv.json()["ranks"]
        return addr["host"], int(addr["port"])

    def _run(self) -> None:
        while True:
            try:
                addr = self._address()
                if addr is None:
                    time.sleep(0.2)
                    continue
                sock = socket.create_connection(addr, timeout=5)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    self._sock = sock
                self.send(Hello(self.slot, self.incarnation))
                self.connected.set()
                while (msg := recv_message(sock)) is not None:
                    self.inbox.put(msg)
            except OSError as exc:
                log.warning("slot %d: front-end link: %s; reconnecting", self.slot, exc)
            except Exception as exc:  # etcd errors, bad frames: keep the link alive
                log.warning("slot %d: front-end link error %r; reconnecting", self.slot, exc)
            self.connected.clear()
            with self._lock:
                self._sock = None
            time.sleep(0.2)

    def send(self, msg: ToFrontend) -> None:
        data = encode(msg)
        with self._lock:
            if self._sock is None:
                raise ConnectionError("front-end not connected")
            self._sock.sendall(data)

    def send_tokens(self, events: list[TokenEvent]) -> None:
        if events:
            rows = [
                (e.request_id, e.index, e.token, e.finished.value if e.finished else None)
                for e in events
            ]
            self.send(Tokens(self.slot, rows))
