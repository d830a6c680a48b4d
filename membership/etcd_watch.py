"""One etcd watch stream through the JSON gateway, read by a background thread, and a watchdog
that ends it when its member can no longer serve.

A stream ends by itself when its member dies (the connection drops) or loses its leader (the
stream carries the require-leader metadata, and etcd cancels it with ``no leader`` within a
few election timeouts). A member that is stopped (SIGSTOP, a hung host) ends nothing: the
connection stays open and silent, exactly like an idle watch. So while a stream is quiet the
watchdog asks its member for its status every ``idle_s``; no answer within the client's
``attempt_s``, or no leader, breaks the stream. Either way the client moves to the next
endpoint, and the owner resumes there from the last revision it processed.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from typing import Any

from .errors import WatchBroken, WatchCompacted
from .etcd_json import Event, KeyValue, WatchBatch, b64, prefix_end
from .etcd_transport import Gateway

log = logging.getLogger(__name__)


class WatchStream:
    """One watch stream read by a background thread.

    ``get(timeout_s)`` returns the next :class:`WatchBatch`, ``None`` on timeout, and raises
    :class:`WatchCompacted` (the start revision was compacted) or :class:`WatchBroken` (the
    stream ended: etcd restarted, the connection dropped, the member lost its leader or stopped
    answering). Either way the caller resumes with a new stream from the last revision it
    processed.
    """

    def __init__(
        self,
        gateway: Gateway,
        key: str,
        start_revision: int,
        prefix: bool,
        idle_s: float | None = None,
    ):
        create: dict[str, Any] = {"key": b64(key), "start_revision": start_revision}
        if prefix:
            create["range_end"] = b64(prefix_end(key))
        self._gateway = gateway
        opened = gateway.open_stream("watch", {"create_request": create})
        self._resp, self._messages = opened.response, opened.messages
        self._idx, self.endpoint = opened.idx, opened.endpoint
        self.idle_s = idle_s or max(1.0, 2 * gateway.attempt_s)
        self._heard = time.monotonic()  # when the stream last delivered a message
        self._queue: queue.Queue[WatchBatch | Exception] = queue.Queue()
        self._closed = threading.Event()  # closed by the owner
        self._ended = threading.Event()  # an error was queued: nothing follows it
        self._thread = threading.Thread(target=self._read, name=f"etcd-watch {key}", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(
            target=self._watch_member, name=f"etcd-watchdog {key}", daemon=True
        )
        self._watchdog.start()

    # --- the reader ------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            for msg in self._messages:
                self._heard = time.monotonic()
                self._handle(msg)
            raise WatchBroken(f"watch stream from {self.endpoint} ended")
        except WatchCompacted as exc:
            self._end(exc, member_failed=False)
        except WatchBroken as exc:
            self._end(exc, member_failed=True)
        except Exception as exc:  # requests, urllib3 and socket errors from a dropped stream
            self._end(WatchBroken(f"watch stream from {self.endpoint} failed: {exc!r}"), True)
        finally:
            self._resp.close()

    def _handle(self, msg: dict[str, Any]) -> None:
        if "error" in msg:  # e.g. {"error": {"grpc_code": 14, "message": "etcdserver: no leader"}}
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

    def _end(self, exc: Exception, member_failed: bool) -> None:
        """Queue the stream's one final error, unless the owner closed it or it already ended;
        a member that failed is left for the next endpoint."""
        if self._closed.is_set() or self._ended.is_set():
            return
        self._ended.set()
        if member_failed:
            self._gateway.skip(self._idx)
        self._queue.put(exc)

    # --- the watchdog ----------------------------------------------------------------------

    def _watch_member(self) -> None:
        while not self._closed.wait(self.idle_s / 4) and not self._ended.is_set():
            if time.monotonic() - self._heard < self.idle_s:
                continue
            problem = self._gateway.probe(self._idx, self._gateway.attempt_s)
            if problem is None:
                self._heard = time.monotonic()
                continue
            log.info(
                "etcd watch: %s cannot serve (%s); breaking the stream", self.endpoint, problem
            )
            self._end(WatchBroken(f"etcd at {self.endpoint} cannot serve: {problem}"), True)
            self._shutdown()
            return

    # --- the owner -------------------------------------------------------------------------

    def get(self, timeout_s: float) -> WatchBatch | None:
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        """End the stream."""
        self._closed.set()
        self._shutdown()

    def _shutdown(self) -> None:
        """The reader thread is blocked in a read on the socket, and closing the response from
        here would wait for it; shutting the socket down wakes it."""
        try:
            fd = self._resp.raw._fp.fileno()  # the live connection's socket
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError, ValueError) as exc:  # already closed by etcd
            log.debug("watch stream shutdown: %r", exc)
