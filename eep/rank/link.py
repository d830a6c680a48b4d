"""The worker's link to the front-end: typed messages in (a queue), tokens and replies out.

The link finds the front-end's rank port in etcd, waits for the front-end's
:class:`~eep.protocol.Challenge`, and answers with a :class:`~eep.protocol.Hello` as this
``(slot, incarnation)`` carrying :func:`eep.auth.proof` of the nonce under the cluster's secret
(the file ``RuntimeConfig.secret_file`` names). It reconnects whenever the connection, the
handshake or etcd fails, and keeps retrying while the secret cannot be read; a worker never
dies of its link.

A front-end keeps its request log in memory, so one that restarted knows nothing of what its
predecessor sent here. Every challenge names the front-end's ``instance``; when the link comes
back to another instance than before, :class:`FrontendChanged` goes into the inbox ahead of
anything the new one sends, and the worker drops every request it holds (their tokens would
have no reader, and their KV would never be freed). A reconnect to the same instance drops
nothing: its requests are still wanted.

A dead front-end's key outlives it by up to one TTL (it is bound to its session's lease), so
ranks may read the dead address: the connection is refused and retried every
:data:`RETRY_S`, with the key read afresh each time, until the restarted front-end overwrites
it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass

from eep.auth import SecretError, load_secret, proof
from eep.engine.engine import TokenEvent
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.protocol import (
    Challenge,
    FrameError,
    Hello,
    Message,
    ToFrontend,
    Tokens,
    encode,
    recv_message,
)

log = logging.getLogger("eep.rank.link")

RETRY_S = 0.2  # between connection attempts
SECRET_RETRY_S = 1.0  # between attempts to read a secret file that failed
HANDSHAKE_TIMEOUT_S = 10.0  # for the challenge to arrive
OUTBOX_FRAMES = 100_000  # frames held for a front-end while the link is down (steps' tokens)
REFUSED_WITHIN_S = 2.0  # a link closed this soon after its hello, unused, was likely refused
UNSENT_LOG_S = 5.0  # tokens the link could not send: logged at most this often


class UnsentLog:
    """Tokens a down link could not send, logged on the first failure of a streak, then at
    most every ``every_s`` with the count since the last line; a send that works ends the
    streak (the next failure is logged at once)."""

    def __init__(self, slot: int, every_s: float = UNSENT_LOG_S, clock=time.monotonic):
        self.slot, self.every_s, self.clock = slot, every_s, clock
        self.last_at: float | None = None  # when the streak was last logged
        self.steps = self.tokens = 0  # failures since then

    def failed(self, tokens: int, exc: OSError) -> bool:
        """Count a failed send; True when this one was logged."""
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens
        now = self.clock()
        if self.last_at is not None and now - self.last_at < self.every_s:
            return False
        if self.last_at is None:
            log.warning(
                "slot %d: could not send %d tokens (queued for the front-end): %s",
                self.slot,
                tokens,
                exc,
            )
        else:
            log.warning(
                "slot %d: %d tokens of %d steps queued in the last %.0f s: %s",
                self.slot,
                self.tokens,
                self.steps,
                now - self.last_at,
                exc,
            )
        self.last_at, self.steps, self.tokens = now, 0, 0
        return True

    def sent(self) -> None:
        if self.last_at is not None and self.steps:
            log.warning(
                "slot %d: %d more tokens of %d steps were queued before the link came back",
                self.slot,
                self.tokens,
                self.steps,
            )
        self.last_at, self.steps, self.tokens = None, 0, 0


@dataclass(frozen=True, slots=True)
class FrontendChanged:
    """Not a wire message: the link came back to front-end ``instance``, another process than
    ``previous``, which sent the requests this rank holds. Put in the inbox before anything
    the new front-end sends."""

    previous: str
    instance: str


class FrontendLink:
    def __init__(
        self, client: EtcdClient, keys: Keys, slot: int, incarnation: int, secret_file: str = ""
    ):
        self.client, self.keys, self.slot, self.incarnation = client, keys, slot, incarnation
        self.secret_file = secret_file
        self.inbox: queue.Queue[Message | FrontendChanged] = queue.Queue()
        self.instance = ""  # the front-end instance of the last handshake
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        # frames not yet sent to this front-end instance, oldest first: a link that drops and
        # comes back to the same front-end sends them before anything newer (that front-end
        # still waits for them, in order); a new instance gets none of them
        self._outbox: collections.deque[bytes] = collections.deque()
        self._last_problem = ""
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._unsent = UnsentLog(slot)
        threading.Thread(target=self._run, name="frontend-link", daemon=True).start()

    def _address(self) -> tuple[str, int] | None:
        kv = self.client.get(self.keys.frontend)
        if kv is None:
            return None
        addr = kv.json()["ranks"]
        return addr["host"], int(addr["port"])

    def _problem(self, level: int, what: str) -> None:
        """Log ``what`` once per streak (a front-end that is down is not logged every retry)."""
        if what != self._last_problem:
            log.log(level, "slot %d: front-end link: %s", self.slot, what)
            self._last_problem = what

    def _secret(self) -> str | None:
        try:
            return load_secret(self.secret_file)
        except SecretError as exc:
            self._problem(logging.ERROR, f"{exc}; cannot prove this rank to the front-end")
            return None

    def _handshake(self, sock: socket.socket, secret: str) -> str:
        """Answer the front-end's challenge with this rank's hello; returns the front-end's
        instance."""
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        challenge = recv_message(sock)
        if challenge is None:
            raise ConnectionError("the front-end closed the link before its challenge")
        if not isinstance(challenge, Challenge):
            raise FrameError(f"the front-end opened with {challenge.TYPE}, not a challenge")
        answer = proof(secret, challenge.nonce, self.slot, self.incarnation)
        sock.sendall(encode(Hello(self.slot, self.incarnation, answer)))
        sock.settimeout(None)
        return challenge.instance

    def _attached(self, instance: str) -> None:
        """The link is up to front-end ``instance``: if another one sent what this rank holds,
        say so in the inbox (before the new front-end's first message can get there)."""
        if self.instance and instance != self.instance:
            log.warning(
                "slot %d: front-end link: a new front-end (instance %s, was %s); dropping the "
                "requests of the old one",
                self.slot,
                instance,
                self.instance,
            )
            self.inbox.put(FrontendChanged(self.instance, instance))
            with self._lock:
                self._outbox.clear()
        self.instance = instance

    def _run(self) -> None:
        secret = None
        while not self._stop.is_set():
            if secret is None and (secret := self._secret()) is None:
                self._stop.wait(SECRET_RETRY_S)
                continue
            received, sock = 0, None
            try:
                addr = self._address()
                if addr is None:
                    self._stop.wait(RETRY_S)
                    continue
                sock = socket.create_connection(addr, timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._attached(self._handshake(sock, secret))
                with self._lock:
                    self._sock = sock
                    self._flush()  # what the last connection could not carry, in order
                self.connected.set()
                up_at = time.monotonic()
                while (msg := recv_message(sock)) is not None:
                    received += 1
                    if received == 1:
                        self._problem(logging.INFO, "up")
                    self.inbox.put(msg)
                refused = not received and time.monotonic() - up_at < REFUSED_WITHIN_S
                if refused and not self._stop.is_set():
                    # a front-end drops a hello it cannot verify without a word: say what
                    # that usually means (once, not on every retry)
                    self._problem(
                        logging.WARNING,
                        "closed right after this rank's hello (a secret or protocol version "
                        "other than the front-end's? its log says why); reconnecting",
                    )
                elif not self._stop.is_set():
                    self._problem(logging.INFO, "closed by the front-end; reconnecting")
            except OSError as exc:
                self._problem(logging.WARNING, f"{exc}; reconnecting")
            except Exception as exc:  # etcd errors, bad frames: keep the link alive
                self._problem(logging.WARNING, f"error {exc!r}; reconnecting")
            self.connected.clear()
            with self._lock:
                self._sock = None
            if sock is not None:
                sock.close()
            self._stop.wait(RETRY_S)

    def close(self) -> None:
        """Stop reconnecting and drop the connection (the thread ends soon after)."""
        self._stop.set()
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def send(self, msg: ToFrontend) -> None:
        """Send ``msg`` after whatever is still queued for this front-end. While the link is
        down it stays queued (and this raises): it goes out, in order, when the link comes
        back to the same front-end, or is dropped if another one answers."""
        data = encode(msg)
        with self._lock:
            if len(self._outbox) >= OUTBOX_FRAMES:
                self._outbox.popleft()
                log.error(
                    "slot %d: more than %d frames queued for the front-end; the oldest is dropped",
                    self.slot,
                    OUTBOX_FRAMES,
                )
            self._outbox.append(data)
            if self._sock is None:
                raise ConnectionError("front-end not connected")
            self._flush()

    def _flush(self) -> None:
        """Send the queued frames in order (the lock held); a frame leaves the queue only
        once it is sent whole."""
        while self._outbox and self._sock is not None:
            self._sock.sendall(self._outbox[0])
            self._outbox.popleft()

    def send_tokens(self, events: list[TokenEvent]) -> bool:
        """Send one step's tokens; False when the link is down. They stay queued for the same
        front-end (see :meth:`send`). The worker meets this every step while the link is
        down: it is logged once, then at most every :data:`UNSENT_LOG_S` with a count, not ~50
        lines a second."""
        if not events:
            return True
        rows = [
            (e.request_id, e.index, e.token, e.finished.value if e.finished else None)
            for e in events
        ]
        try:
            self.send(Tokens(self.slot, rows))
        except OSError as exc:
            self._unsent.failed(len(rows), exc)
            return False
        self._unsent.sent()
        return True
