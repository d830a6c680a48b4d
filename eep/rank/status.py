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
- ``lease_id`` int64, written by the supervisor: the worker binds its manifest to it;
- ``kv_free`` int64, written by the worker: free KV blocks after its last step (for tooling);
- ``suspects``, 4 x uint64 at offset 64, written by the worker: a bitmap of the slots (up to
  ``SUSPECT_SLOTS``) whose exchanges timed out in the epoch of ``resync_epoch``.
Single 8-byte aligned words, each written and read with one 8-byte copy: a reader never
sees half a value (nor the zeros ``struct.pack_into`` writes first). The bitmap is four words,
so it is published in an order (:meth:`StatusBlock.ask_resync`: the bitmap, then
``resync_epoch``) and read back in the other (:meth:`StatusBlock.resync_request`).

The layout has no version word: the supervisor creates the block at this module's size (it
grew from 64 to 96 bytes with the bitmap), and a worker refuses to open a smaller one, made by
a supervisor of another layout, instead of misreading it.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
from collections.abc import Iterable

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
_SUSPECTS_AT, _SUSPECT_WORDS = 64, 4
SUSPECT_SLOTS = 64 * _SUSPECT_WORDS  # slots the suspects bitmap can name
_SIZE = _SUSPECTS_AT + 8 * _SUSPECT_WORDS


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
            elif (size := os.fstat(fd).st_size) < _SIZE:
                raise ValueError(
                    f"{self.path} has {size} bytes, not {_SIZE}: its supervisor uses another "
                    "status layout (a mixed install?)"
                )
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

    def get_suspects(self) -> tuple[int, ...]:
        """The slots in the suspects bitmap, sorted (each word read with one 8-byte copy)."""
        out = []
        for w in range(_SUSPECT_WORDS):
            at = _SUSPECTS_AT + 8 * w
            word = struct.unpack("<Q", self._mm[at : at + 8])[0]
            out += [64 * w + b for b in range(64) if word >> b & 1] if word else []
        return tuple(out)

    def set_suspects(self, slots: Iterable[int]) -> None:
        """Replace the suspects bitmap; a slot outside ``[0, SUSPECT_SLOTS)`` is a ValueError."""
        words = [0] * _SUSPECT_WORDS
        for slot in slots:
            if not 0 <= slot < SUSPECT_SLOTS:
                raise ValueError(f"slot {slot} does not fit the {SUSPECT_SLOTS}-slot bitmap")
            words[slot // 64] |= 1 << (slot % 64)
        for w, word in enumerate(words):
            at = _SUSPECTS_AT + 8 * w
            self._mm[at : at + 8] = struct.pack("<Q", word)

    def ask_resync(self, epoch: int, suspects: Iterable[int]) -> None:
        """The worker: ask for a view newer than ``epoch``, suspecting ``suspects``. The bitmap
        is written first, so a supervisor that sees the new ``resync_epoch`` sees its suspects."""
        self.set_suspects(suspects)
        self.set("resync_epoch", epoch)

    def resync_request(self) -> tuple[int, tuple[int, ...]] | None:
        """The supervisor: ``(resync_epoch, suspects)`` as one consistent pair, or None while
        nothing is asked or the worker is publishing a newer request (read on the next turn):
        ``resync_epoch`` is read before and after the bitmap and must not have moved."""
        epoch = self.get("resync_epoch")
        if not epoch:
            return None
        suspects = self.get_suspects()
        return (epoch, suspects) if self.get("resync_epoch") == epoch else None

    def reset(self, incarnation: int) -> None:
        for name in ("progress", "state", "epoch", "resync_epoch", "kv_free"):
            self.set(name, 0)
        self.set_suspects(())
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
