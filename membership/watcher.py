"""Delivering committed views to a rank, in epoch order, across outages and compactions.

The watcher reads ``view``, then watches it from the next revision. A broken stream (etcd
restarted, connection lost) resumes from the last revision seen; a compacted start revision
makes it re-read the key and watch again from the read's revision. Views arrive in order with
no epoch skipped (gaps are filled from ``views/<epoch>``), and an epoch at or below the last
delivered one is never delivered again. A malformed view is logged and skipped, not fatal.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from .errors import EtcdUnavailable, MalformedView, WatchBroken, WatchCompacted
from .etcd import EtcdClient, WatchStream
from .keys import Keys
from .view import View

log = logging.getLogger(__name__)


class ViewWatcher:
    """Background delivery of committed views.

    Consume with :meth:`next` (a queue: every epoch once, in order), :meth:`wait_for`, or a
    callback ``on_view`` (called from the watcher's thread). ``latest`` is the newest view.
    """

    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        on_view: Callable[[View], None] | None = None,
        retry_s: float = 0.2,
    ):
        self.client, self.keys = client, keys
        self.on_view = on_view
        self.retry_s = retry_s
        self.latest: View | None = None
        self.resumes = 0  # how many times the stream was re-established (for tests and logs)
        self._queue: queue.Queue[View] = queue.Queue()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="view-watcher", daemon=True)

    def start(self) -> ViewWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> ViewWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def next(self, timeout_s: float) -> View | None:
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def wait_for(self, predicate: Callable[[View], bool], timeout_s: float) -> View | None:
        """Block until ``latest`` satisfies ``predicate``; ``None`` on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.latest is None or not predicate(self.latest):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.latest

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        revision = 0  # last store revision whose events were processed; 0: re-read first
        while not self._stop.is_set():
            stream: WatchStream | None = None
            try:
                if revision == 0:
                    revision = self._read_current()
                stream = self.client.watch(self.keys.view, revision + 1)
                revision = self._consume(stream, revision)
            except WatchCompacted as exc:
                log.info("view watch: %s; re-reading", exc)
                revision = 0
            except (WatchBroken, EtcdUnavailable) as exc:
                log.info("view watch interrupted (%s); resuming after revision %d", exc, revision)
                self._stop.wait(self.retry_s)
            finally:
                if stream is not None:
                    stream.close()
            self.resumes += 1

    def _read_current(self) -> int:
        kvs, revision = self.client.range(self.keys.view)
        if kvs:
            self._offer(kvs[0].value)
        return revision

    def _consume(self, stream: WatchStream, revision: int) -> int:
        while not self._stop.is_set():
            batch = stream.get(0.25)
            if batch is None:
                continue
            for event in batch.events:
                if event.kind == "put":
                    self._offer(event.kv.value)
            revision = max(revision, batch.revision)
        return revision

    def _offer(self, raw: bytes) -> None:
        try:
            view = View.from_json(raw, where=self.keys.view)
        except MalformedView as exc:
            log.error("ignoring a malformed committed view: %s", exc)
            return
        last = self.latest.epoch if self.latest else 0
        if view.epoch <= last:
            return
        for epoch in range(last + 1, view.epoch) if last else ():
            self._deliver_from_history(epoch)
        self._deliver(view)

    def _deliver_from_history(self, epoch: int) -> None:
        kv = self.client.get(self.keys.view_at(epoch))
        if kv is None:
            log.warning("view history lacks epoch %d; skipping it", epoch)
            return
        try:
            self._deliver(View.from_json(kv.value, where=kv.key))
        except MalformedView as exc:
            log.error("ignoring a malformed view in history: %s", exc)

    def _deliver(self, view: View) -> None:
        # the callback runs before waiters wake, so what it records precedes what they do
        if self.on_view is not None:
            self.on_view(view)
        self._queue.put(view)
        with self._cond:
            self.latest = view
            self._cond.notify_all()
