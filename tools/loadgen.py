"""The one load generator: streamed requests through the HTTP API, every token timestamped.

Used by ``eep demo``, ``eep bench recovery``, ``eep bench chaos`` and the e2e fault tests, so
each of them drives load the same way and can prove that a fault hit it.

Two modes:
- closed loop (``streams=N``): N client threads, each sending its next request the moment the
  previous one ends, so N streams are held continuously;
- open loop (``rate=R``): requests arrive at R per second (evenly spaced, so two runs offer the
  same load), whatever the server's answers; a request's clock starts at its arrival, so time
  spent waiting for a client thread counts as queueing.

Every stream keeps its request id, tokens and their arrival times on the host's monotonic
clock. :func:`measure_capacity` saturates a cluster for a few seconds to read what it serves.
"""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class LoadError(RuntimeError):
    """The load could not be driven as asked; the message says what to change."""


def prompts_for(n: int) -> list[list[int]]:
    """``n`` distinct short prompts of token ids (the demo's, the tests' and the benches')."""
    return [[(7 * i + 3 * j) % 500 + 1 for j in range(3 + i % 6)] for i in range(n)]


@dataclass
class Stream:
    """One request as its client saw it."""

    seq: int  # order of issue
    prompt_idx: int
    started: float  # arrival (open loop) or send (closed loop), monotonic
    request_id: str = ""
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    ended: float | None = None

    @property
    def done(self) -> bool:
        return self.ended is not None

    @property
    def ttft_s(self) -> float | None:
        return self.times[0] - self.started if self.times else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    def longest_gap(self) -> tuple[float, float] | None:
        """``(begin, end)`` of this stream's longest wait: from its start to its first token,
        or between two of its tokens."""
        marks = [self.started, *self.times]
        gaps = [(b - a, a, b) for a, b in itertools.pairwise(marks)]
        return max(gaps)[1:] if gaps else None


@dataclass(frozen=True)
class LoadSpec:
    """What to offer: ``streams`` (closed loop) or ``rate`` requests/s (open loop)."""

    max_tokens: int = 32
    streams: int | None = None
    rate: float | None = None
    max_outstanding: int = 256  # open loop: client threads; arrivals beyond wait for one
    read_timeout_s: float = 300.0  # longest wait between two bytes (a full restart fits)

    def __post_init__(self) -> None:
        if (self.streams is None) == (self.rate is None):
            raise ValueError("give exactly one of streams (closed loop) and rate (open loop).")
        if self.streams is not None and self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}.")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}.")

    @property
    def mode(self) -> str:
        return "closed" if self.streams is not None else "open"

    def describe(self) -> str:
        if self.streams is not None:
            return f"{self.streams} streams held (closed loop), {self.max_tokens} tokens each"
        return f"{self.rate:.2f} requests/s (open loop), {self.max_tokens} tokens each"


class Load:
    """Streams requests at ``url`` as ``spec`` says until :meth:`stop`."""

    def __init__(self, url: str, prompts: list[list[int]], spec: LoadSpec):
        if not prompts:
            raise LoadError("the load needs at least one prompt")
        self.url, self.prompts, self.spec = url, prompts, spec
        self.streams: list[Stream] = []
        self.started = 0.0
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None

    # --- driving ------------------------------------------------------------------------

    def start(self) -> Load:
        self.started = time.monotonic()
        if self.spec.streams is not None:
            self._threads = [
                threading.Thread(target=self._closed, name=f"load{i}", daemon=True)
                for i in range(self.spec.streams)
            ]
        else:
            self._pool = ThreadPoolExecutor(self.spec.max_outstanding, thread_name_prefix="load")
            self._threads = [threading.Thread(target=self._open, name="arrivals", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def _new_stream(self, started: float) -> Stream:
        with self._lock:
            k = next(self._seq)
            st = Stream(k, k % len(self.prompts), started)
            self.streams.append(st)
        return st

    def _closed(self) -> None:
        import requests

        with requests.Session() as http:
            while not self._stop.is_set():
                st = self._new_stream(time.monotonic())
                self._run(http, st)
                if st.error is not None:
                    self._stop.wait(0.2)  # a refused connection must not spin

    def _open(self) -> None:
        gap = 1.0 / self.spec.rate
        for k in itertools.count():
            due = self.started + k * gap
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            st = self._new_stream(due)
            self._pool.submit(self._run_once, st)

    def _run_once(self, st: Stream) -> None:
        import requests

        with requests.Session() as http:
            self._run(http, st)

    def _run(self, http, st: Stream) -> None:
        import requests

        body = {
            "prompt": self.prompts[st.prompt_idx],
            "max_tokens": self.spec.max_tokens,
            "stream": True,
        }
        try:
            with http.post(
                f"{self.url}/v1/completions",
                json=body,
                stream=True,
                timeout=(10, self.spec.read_timeout_s),
            ) as resp:
                if resp.status_code != 200:
                    st.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    return
                for line in resp.iter_lines():
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    st.times.append(time.monotonic())
                    st.request_id = chunk["id"]
                    st.tokens.append(chunk["choices"][0]["token_ids"][0])
                    st.finish = chunk["choices"][0]["finish_reason"]
        except (requests.RequestException, ValueError, KeyError) as exc:
            st.error = f"{exc.__class__.__name__}: {exc}"
        finally:
            st.ended = time.monotonic()

    def stop(self, timeout_s: float = 120.0) -> int:
        """Stop issuing requests and let those in flight finish; returns how many did not
        finish within ``timeout_s`` (they are reported as lost)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and self.pending():
            time.sleep(0.05)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        return len(self.pending())

    # --- reading ------------------------------------------------------------------------

    def snapshot(self) -> list[Stream]:
        with self._lock:
            return list(self.streams)

    def pending(self) -> list[Stream]:
        return [s for s in self.snapshot() if not s.done]

    def token_times(self) -> list[float]:
        return sorted(t for st in self.snapshot() for t in st.times)

    def tokens_between(self, t0: float, t1: float) -> int:
        return sum(t0 <= t < t1 for st in self.snapshot() for t in st.times)

    def wait_tokens(self, n: int, timeout_s: float) -> bool:
        """Until the load has streamed ``n`` tokens in all (False past ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while sum(len(s.times) for s in self.snapshot()) < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def finished_requests(self, since: float = 0.0) -> int:
        return sum(1 for s in self.snapshot() if s.done and s.error is None and s.ended >= since)


def measure_capacity(
    url: str,
    prompts: list[list[int]],
    max_tokens: int,
    streams: int,
    seconds: float,
    warmup_s: float,
) -> dict:
    """Saturate the cluster with ``streams`` held streams for ``warmup_s + seconds``; returns
    what it served after the warm-up: ``tokens_per_s`` and ``requests_per_s``."""
    load = Load(url, prompts, LoadSpec(max_tokens=max_tokens, streams=streams)).start()
    try:
        time.sleep(warmup_s)
        t0 = time.monotonic()
        time.sleep(seconds)
        t1 = time.monotonic()
    finally:
        load.stop(timeout_s=300)
    tokens = load.tokens_between(t0, t1)
    finished = [s for s in load.snapshot() if s.error is None and s.ended and t0 <= s.ended < t1]
    errors = [s.error for s in load.snapshot() if s.error]
    if errors:
        raise LoadError(f"capacity run failed: {errors[0]}")
    return {
        "streams": streams,
        "seconds": round(t1 - t0, 3),
        "tokens_per_s": round(tokens / (t1 - t0), 2),
        "requests_per_s": round(len(finished) / (t1 - t0), 3),
        "median_tpot_s": _median([s.tpot_s for s in finished]),
    }


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 5) if values else None
