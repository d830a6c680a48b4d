"""The members' JSON gateways, and moving between them: which endpoint a request goes to, when
a failure sends it to the next one, and when it must not.

Nothing else in the project imports ``etcd3gw``; its client gives each endpoint its URLs and
HTTP session, and the JSON is spoken here and in ``etcd``.

Every request carries etcd's require-leader metadata (``hasleader``, as the gRPC gateway
forwards a ``Grpc-Metadata-hasleader`` header): a member that knows it has no leader answers
``etcdserver: no leader`` at once instead of holding the request until its own 6 s timeout,
and cancels a watch within a few election timeouts instead of keeping it open and silent.

A failure on one member moves the client to the next endpoint, where it then stays. What is
repeated there depends on the request:
- a *repeatable* one (reads, lease grant, keepalive, revoke and time-to-live) is tried on
  member after member until the caller's deadline; the first pass gives each member
  ``attempt_s``, so one that is down (refused) or stopped (silent) costs at most that;
- any other (put, delete, compaction, a transaction that writes) is repeated only where it
  provably was not applied: the connection was never made, or etcd refused it before proposing
  it (no leader, too many requests). Once sent, a write is given its whole timeout (giving up
  sooner would only make more unknown outcomes); one that then timed out, or failed with a
  message that leaves its outcome open ("request timed out", "leader changed", any 5xx),
  raises :class:`EtcdUnavailable` at once, and the caller resolves it by reading (design.md
  5.3). The next request goes to the next member;
- a watch is opened in one pass over the members (:meth:`Gateway.open_stream`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import etcd3gw
import requests
import urllib3.exceptions

from .errors import EtcdRequestError, EtcdUnavailable

log = logging.getLogger(__name__)

REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
# refusals made before the request is proposed to raft: repeating them elsewhere is safe
NOT_APPLIED = ("etcdserver: no leader", "etcdserver: too many requests")
# gRPC codes (as the gateway reports them) of a member that cannot serve now: CANCELLED,
# UNKNOWN (a server-side deadline), DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE
CANNOT_SERVE_CODES = {1, 2, 4, 8, 14}
# after a pass over every member failed, wait this long times the passes so far (at most
# PAUSE_MAX_S): members without quorum refuse at once, and must not be asked in a busy loop
PAUSE_S, PAUSE_MAX_S = 0.05, 0.2


@dataclass(frozen=True, slots=True)
class Failure:
    """One endpoint's failure on one try: ``sent`` when the request may have reached etcd."""

    endpoint: str
    what: str
    sent: bool


@dataclass
class OpenStream:
    """A streaming response whose first message has arrived: ``messages`` yields it first."""

    response: requests.Response
    messages: Iterator[dict[str, Any]]
    idx: int
    endpoint: str


class Gateway:
    """Endpoints (``host:port``) and the one the client uses now."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float, attempt_s: float):
        if not endpoints:
            raise ValueError("EtcdClient needs at least one endpoint of the form host:port.")
        if not 0 < attempt_s <= timeout_s:
            raise ValueError(f"attempt_s {attempt_s} must be in (0, timeout_s {timeout_s}].")
        self.endpoints = tuple(endpoints)
        self.timeout_s, self.attempt_s = timeout_s, attempt_s
        self._clients = [_make(e, timeout_s) for e in self.endpoints]
        self._current = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> int:
        with self._lock:
            return self._current

    def skip(self, idx: int) -> None:
        """Move off endpoint ``idx`` unless another thread already has."""
        with self._lock:
            if self._current == idx:
                self._current = (idx + 1) % len(self._clients)

    def url(self, idx: int, path: str) -> str:
        return self._clients[idx].get_url(path)

    def close(self) -> None:
        for client in self._clients:
            client.session.close()

    # --- unary requests --------------------------------------------------------------------

    def post(
        self, path: str, body: dict[str, Any], timeout_s: float | None, repeatable: bool
    ) -> Any:
        """POST ``body`` to ``path`` on the current member, moving on as the module says."""
        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        failures: list[Failure] = []
        while (left := deadline - time.monotonic()) > 0:
            idx = self.current
            rounds = len(failures) // len(self._clients)
            # a write waits out its whole deadline: giving up early makes an unknown outcome
            attempt = min(left, self.attempt_s * 2**rounds) if repeatable else left
            outcome = self._try(idx, path, body, attempt)
            if not isinstance(outcome, Failure):
                return outcome
            failure = outcome
            failures.append(failure)
            self.skip(idx)
            if failure.sent and not repeatable:
                raise EtcdUnavailable(
                    f"etcd at {failure.endpoint} did not complete {path} ({failure.what}): it "
                    "may or may not have been applied; read the keys back before writing again."
                )
            _pause_after_pass(len(failures), len(self._clients), deadline)
        raise EtcdUnavailable(
            f"no etcd endpoint answered {path} within {timeout_s:.1f} s "
            f"({'; '.join(f'{f.endpoint}: {f.what}' for f in failures[-3:]) or 'no time'}). "
            f"Check that etcd runs (`etcdctl --endpoints {','.join(self.endpoints)} endpoint "
            "health`) or point --etcd at a live cluster."
        )

    def _try(self, idx: int, path: str, body: dict[str, Any], timeout_s: float) -> Any:
        """The answer of member ``idx``, a :class:`Failure`, or :class:`EtcdRequestError`."""
        endpoint = self.endpoints[idx]
        try:
            resp = self._clients[idx].session.post(
                self.url(idx, path), json=body, headers=REQUIRE_LEADER, timeout=timeout_s
            )
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            return Failure(endpoint, exc.__class__.__name__, sent=not _never_connected(exc))
        if resp.status_code == 200:
            return resp.json()
        message, code = _error_of(resp)
        if any(m in message for m in NOT_APPLIED):
            return Failure(endpoint, message, sent=False)
        if resp.status_code >= 500 or code in CANNOT_SERVE_CODES:
            return Failure(endpoint, f"HTTP {resp.status_code} {message}", sent=True)
        raise EtcdRequestError(
            f"etcd at {endpoint} refused {path}: HTTP {resp.status_code} {message[:300]}"
        )

    # --- streams ---------------------------------------------------------------------------

    def open_stream(self, path: str, body: dict[str, Any]) -> OpenStream:
        """Open a streaming request (a watch) on the current member, or else on the next ones:
        one pass, each member given its share of the timeout (at least ``attempt_s``) to
        answer with a first message that is not an error (one without a leader answers
        ``no leader``). The owners of streams retry on their own, after a pause."""
        failures: list[str] = []
        attempt_s = max(self.attempt_s, self.timeout_s / len(self._clients))
        for _ in self._clients:
            idx = self.current
            try:
                opened = self._open_on(idx, path, body, attempt_s)
            except (requests.exceptions.RequestException, StopIteration, ValueError) as exc:
                opened = exc.__class__.__name__
            if isinstance(opened, OpenStream):
                return opened
            failures.append(f"{self.endpoints[idx]}: {opened}")
            self.skip(idx)
        raise EtcdUnavailable(
            f"no etcd endpoint accepted a watch ({'; '.join(failures)}); check that etcd runs."
        )

    def _open_on(
        self, idx: int, path: str, body: dict[str, Any], timeout_s: float
    ) -> OpenStream | str:
        resp = self._clients[idx].session.post(
            self.url(idx, path), json=body, headers=REQUIRE_LEADER, stream=True, timeout=timeout_s
        )
        messages = json_messages(resp)
        try:
            first = next(messages)  # bounded by the socket's timeout, still ``timeout_s``
        except Exception:
            resp.close()
            raise
        if "error" in first:
            resp.close()
            error = first["error"]  # {"message", "grpc_code", ...} in a stream, else a string
            return str(error.get("message", error) if isinstance(error, dict) else error)[:200]
        # the stream idles between events for as long as nothing changes: reads are unbounded
        # from here on, and a member that goes silent is found by probing it (``probe``)
        resp.raw.connection.sock.settimeout(None)
        return OpenStream(resp, _chain(first, messages), idx, self.endpoints[idx])

    def probe(self, idx: int, timeout_s: float) -> str | None:
        """Why member ``idx`` cannot serve now (silent, down, without a leader), or ``None``."""
        try:
            resp = self._clients[idx].session.post(
                self.url(idx, "maintenance/status"),
                json={},
                headers=REQUIRE_LEADER,
                timeout=timeout_s,
            )
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            return exc.__class__.__name__
        if resp.status_code != 200:
            return f"HTTP {resp.status_code} {_error_of(resp)[0]}"
        return None if int(resp.json().get("leader", 0) or 0) else "no leader"


def json_messages(resp: requests.Response) -> Iterator[dict[str, Any]]:
    """JSON messages as they arrive: the gateway sends one per chunk, not always followed by a
    newline, so line-based reading would hold each message back until the next."""
    decoder = json.JSONDecoder()
    buf = ""
    for chunk in resp.iter_content(chunk_size=None):
        buf += chunk.decode()
        while True:
            buf = buf.lstrip()
            if not buf:
                break
            try:
                msg, end = decoder.raw_decode(buf)
            except ValueError:
                break  # an incomplete message: wait for the rest
            buf = buf[end:]
            yield msg


def _pause_after_pass(num_failures: int, num_endpoints: int, deadline: float) -> None:
    if num_failures % num_endpoints == 0:
        pause = min(PAUSE_S * (num_failures // num_endpoints), PAUSE_MAX_S)
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))


def _chain(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest


def _make(endpoint: str, timeout_s: float) -> etcd3gw.Etcd3Client:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} is not of the form host:port.")
    return etcd3gw.Etcd3Client(
        host=host.strip("[]") or "127.0.0.1", port=int(port), timeout=timeout_s, api_path="/v3/"
    )


def _never_connected(exc: Exception) -> bool:
    """The request never left: the connection was refused or timed out being made."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(
        reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
    )


def _error_of(resp: requests.Response) -> tuple[str, int]:
    """The gateway's error message and gRPC code (``{"error", "message", "code"}``)."""
    try:
        obj = resp.json()
    except ValueError:
        return resp.text.strip()[:300], 0
    if not isinstance(obj, dict):
        return str(obj)[:300], 0
    return str(obj.get("message") or obj.get("error") or obj)[:300], int(obj.get("code", 0) or 0)
