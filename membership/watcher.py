"""Delivering committed views to a rank, in epoch order, across outages and compactions.

The watcher reads ``view``, then watches it from the next revision. A broken stream (etcd
restarted, connection lost) resumes from the last revision seen; a compacted start revision
makes it re-read the key and watch again from the read's revision. Views arrive in order with
no epoch skipped (gaps are filled from ``views/<epoch>``), and an epoch at or below the last
delivered one is never delivered again.

Only committed views are delivered: a value of ``view`` that ``views/<its epoch>`` does not
hold byte for byte (garbage, a hand-written view, a huge epoch) is logged once and ignored,
so it can never hold back the epochs that follow. At start, and after a compaction, the
current view is the newest history entry when ``view`` itself is not one (``read_committed``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from .commit import parse_entry, read_committed
from .errors import (
    MALFORMED,
    EtcdRequestError,
    EtcdUnavailable,
    MalformedRecord,
    MalformedView,
    WatchBroken,
    WatchCompacted,
)
from .etcd import EtcdClient, KeyValue, WatchStream
from .keys import Keys
from .view import View

log = logging.getLogger(__name__)

_GAP_BY_KEY = 64  # a gap of up to this many epochs is filled key by key


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
            except (WatchBroken, EtcdUnavailable, EtcdRequestError) as exc:
                log.info("view watch interrupted (%s); resuming after revision %d", exc, revision)
                self._stop.wait(self.retry_s)
            finally:
                if stream is not None:
                    stream.close()
            self.resumes += 1

    def _read_current(self) -> int:
        state = read_committed(self.client, self.keys)
        if state.view is not None:
            self._accept(state.view)
        return state.read_revision

    def _consume(self, stream: WatchStream, revision: int) -> int:
        while not self._stop.is_set():
            batch = stream.get(0.25)
            if batch is None:
                continue
            for event in batch.events:
                if event.kind == "put":
                    self._offer(event.kv)
            revision = max(revision, batch.revision)
        return revision

    def _offer(self, kv: KeyValue) -> None:
        """A new value of ``view``: delivered if it is newer and the history holds it."""
        try:
            view = View.from_json(kv.value, where=kv.key)
        except MalformedView as exc:
            MALFORMED.warn(log, kv.key, kv.mod_revision, str(exc))
            return
        if self.latest is not None and view.epoch <= self.latest.epoch:
            return
        entry = self.client.get(self.keys.view_at(view.epoch))
        if entry is None or entry.value != kv.value:
            problem = (
                f"{kv.key} holds epoch {view.epoch}, which the history does not hold "
                f"({self.keys.view_at(view.epoch)} is {'different' if entry else 'absent'})"
            )
            MALFORMED.warn(log, kv.key, kv.mod_revision, problem)
            return
        self._accept(view)

    def _accept(self, view: View) -> None:
        """Deliver ``view`` after the epochs between the last delivered one and it."""
        last = self.latest.epoch if self.latest else 0
        if view.epoch <= last:
            return
        if last and view.epoch > last + 1:
            self._fill(last, view.epoch)
        self._deliver(view)

    def _fill(self, last: int, epoch: int) -> None:
        """Deliver the history's views of the epochs strictly between ``last`` and ``epoch``.
        A short gap is read key by key; a long one (a view far beyond the last) in one range
        read, so the work is bounded by the keys that exist, never by the gap."""
        gap = epoch - last - 1
        if gap <= _GAP_BY_KEY:
            entries = [(e, self.client.get(self.keys.view_at(e))) for e in range(last + 1, epoch)]
        else:
            kvs, _ = self.client.get_prefix(self.keys.views)
            found = {}
            for kv in kvs:
                try:
                    e = self.keys.epoch_of(kv.key)
                except MalformedRecord:
                    continue
                if last < e < epoch:
                    found[e] = kv
            entries = sorted(found.items())
        delivered = 0
        for e, kv in entries:
            if kv is None:
                continue
            try:
                view = parse_entry(kv, e)
            except MalformedView as exc:
                MALFORMED.warn(log, kv.key, kv.mod_revision, str(exc))
                continue
            self._deliver(view)
            delivered += 1
        if delivered < gap:
            log.warning(
                "view history lacks %d of the epochs %d..%d; skipping them",
                gap - delivered,
                last + 1,
                epoch - 1,
            )

    def _deliver(self, view: View) -> None:
        # the callback runs before waiters wake, so what it records precedes what they do
        if self.on_view is not None:
            try:
                self.on_view(view)
            except Exception:  # one view the consumer chokes on must not end the deliveries
                log.exception("the view callback failed on epoch %d", view.epoch)
        self._queue.put(view)
        with self._cond:
            self.latest = view
            self._cond.notify_all()
