"""The one adapter over the ``etcd3gw`` client (etcd's v3 JSON gateway).

Nothing else in the project imports ``etcd3gw``. This module speaks the gateway's JSON API
directly through the client's HTTP session for what ``etcd3gw`` does not expose (revisions in
responses, compare-and-swap transactions with several compares, watch headers and compaction
notices), and turns every failure into a typed error from ``errors``.

Every request has a timeout; a request that times out has an unknown outcome, so writers that
care (the view commit) resolve it by re-reading, never by blindly repeating.

Here: the client (:class:`EtcdClient`: KV, transactions, leases) and :class:`WatchStream`. The
records they return and the transaction builders are plain data in ``etcd_json``, re-exported
here so that callers import everything etcd from this one module.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import etcd3gw
import requests

from .errors import EtcdRequestError, EtcdUnavailable, WatchBroken, WatchCompacted
from .etcd_json import (
    Event,
    KeyValue,
    TxnResult,
    WatchBatch,
    b64,
    cmp_create,
    cmp_lease,
    cmp_mod,
    op_delete,
    op_get,
    op_put,
    prefix_end,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0


class EtcdClient:
    """A small, typed etcd v3 client over one or more endpoints (``host:port``).

    Requests go to the first endpoint that answers; a connection failure moves on to the next
    one. ``timeout_s`` bounds every unary request.
    """

    def __init__(self, endpoints: Sequence[str] | str, timeout_s: float = DEFAULT_TIMEOUT_S):
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        if not endpoints:
            raise ValueError("EtcdClient needs at least one endpoint of the form host:port.")
        self.endpoints = tuple(endpoints)
        self.timeout_s = timeout_s
        self._clients = [self._make(e) for e in self.endpoints]
        self._current = 0
        self._lock = threading.Lock()

    def _make(self, endpoint: str) -> etcd3gw.Etcd3Client:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint {endpoint!r} is not of the form host:port.")
        client = etcd3gw.Etcd3Client(
            host=host.strip("[]") or "127.0.0.1",
            port=int(port),
            timeout=self.timeout_s,
            api_path="/v3/",
        )
        return client

    def __repr__(self) -> str:
        return f"EtcdClient({','.join(self.endpoints)})"

    # --- transport -------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any], timeout_s: float | None = None) -> Any:
        errors = []
        for _ in range(len(self._clients)):
            with self._lock:
                idx = self._current
            client = self._clients[idx]
            try:
                resp = client.session.post(
                    client.get_url(path), json=body, timeout=timeout_s or self.timeout_s
                )
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                errors.append(f"{self.endpoints[idx]}: {exc.__class__.__name__}")
                with self._lock:
                    self._current = (idx + 1) % len(self._clients)
                last_exc: Exception = exc
                continue
            if resp.status_code != 200:
                raise EtcdRequestError(
                    f"etcd at {self.endpoints[idx]} refused {path}: HTTP {resp.status_code} "
                    f"{resp.text.strip()[:300]}"
                )
            return resp.json()
        raise EtcdUnavailable(
            f"no etcd endpoint answered {path} within {timeout_s or self.timeout_s:.1f} s "
            f"({'; '.join(errors)}). Check that etcd runs "
            f"(`etcdctl --endpoints {','.join(self.endpoints)} endpoint health`) "
            "or point --etcd at a live cluster."
        ) from last_exc

    # --- KV --------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        kvs, _ = self.range(key)
        return kvs[0] if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix``, sorted by key, and the store revision of the read."""
        return self.range(prefix, prefix_end(prefix))

    def range(self, key: str, range_end: str | None = None) -> tuple[list[KeyValue], int]:
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        result = self._post("kv/range", body)
        kvs = [KeyValue.from_json(kv) for kv in result.get("kvs", [])]
        return kvs, int(result["header"]["revision"])

    def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        """Write ``key``; returns the new store revision. A missing lease is an error."""
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = lease
        return int(self._post("kv/put", body)["header"]["revision"])

    def delete(self, key: str, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many keys were deleted."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        return int(self._post("kv/deleterange", body).get("deleted", 0))

    def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> TxnResult:
        result = self._post(
            "kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)}
        )
        responses = []
        for resp in result.get("responses", []):
            rng = resp.get("response_range")
            kvs = rng.get("kvs", []) if rng else []
            responses.append(tuple(KeyValue.from_json(kv) for kv in kvs))
        return TxnResult(
            succeeded=bool(result.get("succeeded", False)),
            revision=int(result["header"]["revision"]),
            responses=tuple(responses),
        )

    def compact(self, revision: int) -> None:
        self._post("kv/compaction", {"revision": revision, "physical": True})

    def revision(self) -> int:
        """The current store revision (a linearizable read)."""
        return self.range("\0")[1]

    # --- leases ----------------------------------------------------------------------------

    def lease_grant(self, ttl_s: int) -> tuple[int, int]:
        """Grant a lease; returns ``(lease_id, granted_ttl_s)`` (etcd may raise the TTL)."""
        result = self._post("lease/grant", {"TTL": int(ttl_s)})
        if result.get("error"):
            raise EtcdRequestError(f"etcd refused a lease of {ttl_s} s: {result['error']}")
        return int(result["ID"]), int(result["TTL"])

    def lease_keepalive(self, lease_id: int, timeout_s: float | None = None) -> int:
        """Renew a lease once; returns the new TTL, or -1 if the lease no longer exists.
        ``timeout_s`` (default: the client's) bounds the request on each endpoint."""
        result = self._post("lease/keepalive", {"ID": lease_id}, timeout_s=timeout_s)
        return int(result.get("result", {}).get("TTL", -1))

    def lease_revoke(self, lease_id: int) -> bool:
        """Revoke a lease (its keys are deleted in one revision); False if it was gone."""
        try:
            self._post("kv/lease/revoke", {"ID": lease_id})
        except EtcdRequestError as exc:
            if "not found" in str(exc):
                return False
            raise
        return True

    def lease_ttl(self, lease_id: int) -> int:
        """Whole seconds left on a lease (0: under one), or -1 if it does not exist."""
        # proto3 JSON leaves a zero TTL out; a missing lease is an explicit -1
        return int(self._post("kv/lease/timetolive", {"ID": lease_id}).get("TTL", 0))

    # --- watch -----------------------------------------------------------------------------

    def watch(self, key: str, start_revision: int, prefix: bool = False) -> WatchStream:
        """Open a watch on ``key`` (or every key under it) from ``start_revision``."""
        return WatchStream(self, key, start_revision, prefix)

    def _open_stream(self, body: dict[str, Any]) -> tuple[requests.Response, str]:
        errors = []
        for _ in range(len(self._clients)):
            with self._lock:
                idx = self._current
            client = self._clients[idx]
            try:
                # connect bounded; the read side is unbounded because a watch idles
                resp = client.session.post(
                    client.get_url("watch"), json=body, stream=True, timeout=(self.timeout_s, None)
                )
                return resp, self.endpoints[idx]
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                errors.append(f"{self.endpoints[idx]}: {exc.__class__.__name__}")
                with self._lock:
                    self._current = (idx + 1) % len(self._clients)
        raise EtcdUnavailable(
            f"no etcd endpoint accepted a watch ({'; '.join(errors)}); check that etcd runs."
        )

    def close(self) -> None:
        for client in self._clients:
            client.session.close()


class WatchStream:
    """One watch stream read by a background thread.

    ``get(timeout_s)`` returns the next :class:`WatchBatch`, ``None`` on timeout, and raises
    :class:`WatchCompacted` (the start revision was compacted) or :class:`WatchBroken` (the
    stream ended: etcd restarted, the connection dropped). Either way the caller resumes with a
    new stream from the last revision it processed.
    """

    def __init__(self, client: EtcdClient, key: str, start_revision: int, prefix: bool):
        create: dict[str, Any] = {"key": b64(key), "start_revision": start_revision}
        if prefix:
            create["range_end"] = b64(prefix_end(key))
        self._resp, self.endpoint = client._open_stream({"create_request": create})
        self._queue: queue.Queue[WatchBatch | Exception] = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"etcd-watch {key}", daemon=True)
        self._thread.start()

    def _messages(self) -> Iterator[dict[str, Any]]:
        """JSON messages as they arrive: the gateway sends one per chunk, not always followed
        by a newline, so line-based reading would hold each message back until the next."""
        decoder = json.JSONDecoder()
        buf = ""
        for chunk in self._resp.iter_content(chunk_size=None):
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

    def _read(self) -> None:
        try:
            for msg in self._messages():
                self._handle(msg)
            raise WatchBroken(f"watch stream from {self.endpoint} ended")
        except (WatchBroken, WatchCompacted) as exc:
            self._queue.put(exc)
        except Exception as exc:  # requests, urllib3 and socket errors from a dropped stream
            if not self._closed.is_set():
                self._queue.put(WatchBroken(f"watch stream from {self.endpoint} failed: {exc!r}"))
        finally:
            self._resp.close()

    def _handle(self, msg: dict[str, Any]) -> None:
        if "error" in msg:
            raise WatchBroken(f"watch failed at {self.endpoint}: {msg['error']}")
        result = msg.get("result", {})
        compact = int(result.get("compact_revision", 0) or 0)
        if compact:
            raise WatchCompacted(f"watch start revision compacted (now {compact})")
        if result.get("created") and not result.get("events"):
            return
        if result.get("canceled"):
            raise WatchBroken(f"etcd canceled the watch: {result.get('cancel_reason')}")
        events = tuple(
            Event(kind=e.get("type", "PUT").lower(), kv=KeyValue.from_json(e["kv"]))
            for e in result.get("events", [])
        )
        revision = int(result.get("header", {}).get("revision", 0))
        if events:
            revision = max(revision, events[-1].kv.mod_revision)
        self._queue.put(WatchBatch(revision=revision, events=events))

    def get(self, timeout_s: float) -> WatchBatch | None:
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        """End the stream. The reader thread is blocked in a read on the socket, and closing
        the response from here would wait for it; shutting the socket down wakes it."""
        self._closed.set()
        try:
            fd = self._resp.raw._fp.fileno()  # the live connection's socket
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError, ValueError) as exc:  # already closed by etcd
            log.debug("watch stream shutdown: %r", exc)


__all__ = [
    "EtcdClient",
    "Event",
    "KeyValue",
    "TxnResult",
    "WatchBatch",
    "WatchStream",
    "cmp_create",
    "cmp_lease",
    "cmp_mod",
    "op_delete",
    "op_get",
    "op_put",
    "prefix_end",
]
