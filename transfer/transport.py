"""What every transport (``engine.MooncakeTransport``, ``ipc.IpcTransport``) speaks: how a peer
and its registered regions are named, and one request in flight.

Kept apart from both transports, so that each imports these types without importing the other
(``engine.start_transport`` picks one of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Op(Enum):
    READ = "read"
    WRITE = "write"


class Poll(Enum):
    PENDING = 0
    DONE = 1
    FAILED = -1


@dataclass(frozen=True, slots=True)
class Region:
    """One registered region as peers see it (a manifest's ``arenas`` entry).

    ``addr``/``nbytes``: the holder's virtual address range; ``medium``: ``device`` or
    ``host``; ``device``: ``cpu`` or ``cuda:N``; ``ipc``: for ``cuda_ipc``, the hex of the
    region's CUDA IPC handle and its offset from the allocation base (``<hex>@<offset>``).
    ``block_nbytes``: for KV arenas, the size of one block (0 elsewhere).
    """

    name: str
    addr: int
    nbytes: int
    medium: str = "host"
    device: str = "cpu"
    ipc: str = ""
    block_nbytes: int = 0

    def contains(self, addr: int, nbytes: int) -> bool:
        return self.addr <= addr and addr + nbytes <= self.addr + self.nbytes


@dataclass(frozen=True, slots=True)
class PeerRef:
    """What a process needs to reach one peer: its session (``host:port``), protocol, host
    identity and registered regions. ``holder`` names it in errors and logs."""

    holder: str
    session: str
    protocol: str
    host_id: str
    regions: tuple[Region, ...] = ()
    pid: int = 0

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)


@dataclass(slots=True)
class Ticket:
    """One asynchronous request in flight."""

    peer: PeerRef
    op: Op
    nbytes: int
    handle: object = None
    done: bool = False
