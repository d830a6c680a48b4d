"""The block of shared memory between a slot's supervisor and its worker.

``/dev/shm/eep-<cluster>-status-<slot>``, fixed layout (little-endian):
- ``progress`` int64, written by the worker: moves on every step and idle heartbeat;
- ``state`` int64, written by the worker: 0 starting, 1 ready;
- ``incarnation`` int64, written by the supervisor before it starts the worker;
- ``fence_deadline`` float64, written by the supervisor: ``time.monotonic()`` after which the
  slot's lease may be gone (CLOCK_MONOTONIC is one clock for every process of the host);
- ``epoch`` int64, written by the worker: the view it serves;
- ``resync_epoch`` int64, written by the worker: it suspects a peer that no view removed and
  asks (through the supervisor's slot record) for a view newer than this epoch;
- ``lease_id`` int64, written by the supervisor: the worker binds its manifest to it.
Single 8-byte aligned words, each written and read with one 8-byte copy: a reader never
sees half a value (nor the zeros ``struct.pack_into`` writes first).
"""

from __future__ import annotations

import enum
import mmap
import os
import struct

_FIELDS = {
    "progress": (0, "<q"),
    "state": (8, "<q"),
    "incarnation": (16, "<q"),
    "fence_deadline": (24, "<d"),
    "epoch": (32, "<q"),
    "resync_epoch": (40, "<q"),
    "lease_id": (48, "<q"),
    "kv_free": (56, "<q"),  # free KV blocks after the worker's last step (for tooling)
}
_SIZE = 64


class WorkerState(enum.IntEnum):
    STARTING = 0
    READY = 1


def status_path(cluster: str, slot: int) -> str:
    return f"/dev/shm/eep-{cluster}-status-{slot}"


class StatusBlock:
    def __init__(self, cluster: str, slot: int, create: bool = False):
        self.path = status_path(cluster, slot)
        fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, _SIZE)
            self._mm = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)

    def get(self, name: str):
        offset, fmt = _FIELDS[name]
        # one 8-byte copy out of the shared page, then decode: decoding in place reads the
        # word byte by byte and can mix two writes
        return struct.unpack(fmt, self._mm[offset : offset + 8])[0]

    def set(self, name: str, value) -> None:
        offset, fmt = _FIELDS[name]
        # encode first, then one 8-byte copy into the page. ``struct.pack_into`` zeroes its
        # destination before it writes the value, so a reader could see 0 in between: a
        # fence deadline of 0 fenced healthy workers (seen at start-up and under load)
        self._mm[offset : offset + 8] = struct.pack(fmt, value)

    def reset(self, incarnation: int) -> None:
        for name in ("progress", "state", "epoch", "resync_epoch", "kv_free"):
            self.set(name, 0)
        self.set("fence_deadline", 0.0)
        self.set("incarnation", incarnation)

    def bump(self) -> None:
        self.set("progress", self.get("progress") + 1)

    def close(self, unlink: bool = False) -> None:
        self._mm.close()
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
