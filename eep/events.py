"""Structured event logs: what the recovery benchmark reads to build its timeline.

Every process of a cluster appends JSON lines ``{"event", "wall", "mono", "pid", ...}`` to
``<log dir>/events-<process>.jsonl`` (the supervisors and workers get the directory from the
launcher). ``mono`` is ``time.monotonic()``: one clock for every process of a host, so events
of different processes order correctly; ``wall`` is for people.
"""

from __future__ import annotations

import json
import os
import threading
import time

_lock = threading.Lock()


class EventLog:
    """Appends events to one file; a ``None`` path makes it a no-op."""

    def __init__(self, path: str | None):
        self.path = path

    @classmethod
    def in_dir(cls, log_dir: str | None, process: str) -> EventLog:
        return cls(os.path.join(log_dir, f"events-{process}.jsonl") if log_dir else None)

    def emit(self, event: str, **fields) -> None:
        if self.path is None:
            return
        record = {
            "event": event,
            "wall": time.time(),
            "mono": time.monotonic(),
            "pid": os.getpid(),
            **fields,
        }
        line = json.dumps(record, sort_keys=True) + "\n"
        with _lock, open(self.path, "a") as f:
            f.write(line)


def read_events(log_dir: str) -> list[dict]:
    """Every event of every process under ``log_dir``, ordered by the monotonic clock."""
    events = []
    for name in sorted(os.listdir(log_dir)):
        if name.startswith("events-") and name.endswith(".jsonl"):
            with open(os.path.join(log_dir, name)) as f:
                for line in f:
                    if line.strip():
                        events.append({**json.loads(line), "process": name[7:-6]})
    return sorted(events, key=lambda e: e["mono"])
