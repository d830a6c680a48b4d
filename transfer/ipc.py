"""Intra-host GPU-to-GPU transfers over CUDA IPC, behind the engine's API.

Why it exists: the lent GPU machine has no RDMA NICs, and Mooncake's intra-host NVLink
transport is only installed when ``MC_INTRANODE_NVLINK`` is set (see ``engine``); this path
needs nothing but the CUDA driver (``eep.cuda_driver``). A holder exports one IPC handle per
registered arena (the handle goes into its manifest's region,
``ipc = "<hex>@<offset from allocation base>"``); a reader opens it once
(``cuIpcOpenMemHandle`` with lazy peer access) and copies with ``cuMemcpyAsync`` on one stream
per holder, so reads from several holders run on several copy engines at once. Completion is
an event per request, polled without blocking.

An IPC mapping keeps the holder's memory alive after the holder dies, so a dead holder's
bytes stay readable; its death is noticed through etcd (lease, manifest) instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from eep.cuda_driver import (
    HANDLE_BYTES,
    LAZY_ENABLE_PEER_ACCESS,
    CudaDriverMissing,
    IpcHandle,
    cuda_error,
    load_driver,
)

from .config import TransferConfig
from .errors import EngineError, PeerUnreachable, SourceTimeout, TransferFailed
from .transport import Op, PeerRef, Poll, Region, Ticket

log = logging.getLogger(__name__)


@dataclass
class IpcTransport:
    """CUDA IPC between processes of one host; ``session`` is ``host:ipc:pid``."""

    config: TransferConfig
    session: str = ""
    _cu: object = field(default=None, repr=False)
    _device: int = 0
    _opened: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)
    _bases: list[int] = field(default_factory=list, repr=False)
    _streams: dict[str, torch.cuda.Stream] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def start(cls, config: TransferConfig) -> IpcTransport:
        if not torch.cuda.is_available():
            raise EngineError("protocol cuda_ipc needs a CUDA GPU; use tcp on CPU machines.")
        self = cls(config=config, session=f"{config.hostname}:ipc:{os.getpid()}")
        try:
            self._cu = load_driver()
        except CudaDriverMissing as exc:
            raise EngineError(str(exc)) from exc
        self._device = torch.cuda.current_device()
        torch.cuda.init()
        return self

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise EngineError(f"{what} failed: {cuda_error(rc)}.")

    def _ensure_context(self) -> None:
        ctx = ctypes.c_void_p()
        self._check(self._cu.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            self._check(
                self._cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self._device),
                "cuDevicePrimaryCtxRetain",
            )
            self._check(self._cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    # --- memory ----------------------------------------------------------------------------

    def register(self, addr: int, nbytes: int, location: str) -> str:
        """Export the allocation holding ``addr``; returns ``<hex handle>@<offset>``."""
        if not location.startswith("cuda"):
            raise EngineError(f"cuda_ipc registers device memory only, got {location!r}.")
        self._ensure_context()
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._check(
            self._cu.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), addr),
            "cuMemGetAddressRange",
        )
        if addr + nbytes > base.value + size.value:
            raise EngineError(f"region {addr:#x}+{nbytes} spans several CUDA allocations.")
        handle = IpcHandle()
        self._check(
            self._cu.cuIpcGetMemHandle(ctypes.byref(handle), base.value), "cuIpcGetMemHandle"
        )
        return f"{bytes(handle.reserved).hex()}@{addr - base.value}"

    def unregister(self, addr: int) -> None:
        """Nothing to undo: an exported handle stays valid while the memory lives."""

    # --- peers -----------------------------------------------------------------------------

    def check_reachable(self, peer: PeerRef) -> None:
        if peer.host_id != self.config.host_id:
            raise PeerUnreachable(
                f"peer {peer.holder} is on host {peer.host_id!r}, not {self.config.host_id!r}: "
                "cuda_ipc works within one host; use rdma or tcp across hosts.",
                op="connect",
                peer=peer.session,
                holder=peer.holder,
            )
        if peer.pid:
            try:
                os.kill(peer.pid, 0)
            except ProcessLookupError as exc:
                raise PeerUnreachable(
                    f"peer {peer.holder} (pid {peer.pid}) is not running.",
                    op="connect",
                    peer=peer.session,
                    holder=peer.holder,
                ) from exc
            except PermissionError:
                pass

    def forget(self, peer: PeerRef) -> None:
        """Mappings stay open: closing one under an in-flight copy would fault."""

    def _mapped(self, peer: PeerRef, region: Region) -> int:
        key = (peer.session, region.name)
        with self._lock:
            if key in self._opened:
                return self._opened[key]
            hexed, _, offset = region.ipc.partition("@")
            if not hexed:
                raise TransferFailed(
                    "open",
                    peer.session,
                    -1,
                    f"region {region.name!r} has no IPC handle",
                    peer.holder,
                )
            self._ensure_context()
            raw = bytes.fromhex(hexed)
            if len(raw) != HANDLE_BYTES:
                raise TransferFailed("open", peer.session, -1, "malformed IPC handle", peer.holder)
            handle = IpcHandle.from_buffer_copy(raw)
            ptr = ctypes.c_uint64()
            rc = self._cu.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), handle, LAZY_ENABLE_PEER_ACCESS)
            if rc != 0:
                raise TransferFailed(
                    "ipc open",
                    peer.session,
                    rc,
                    "cuIpcOpenMemHandle refused the handle",
                    peer.holder,
                )
            self._bases.append(ptr.value)
            self._opened[key] = ptr.value + int(offset)
            return self._opened[key]

    def _translate(self, peer: PeerRef, remote: int, nbytes: int) -> int:
        for region in peer.regions:
            if region.contains(remote, nbytes):
                return self._mapped(peer, region) + (remote - region.addr)
        raise TransferFailed(
            "translate",
            peer.session,
            -1,
            f"{nbytes} bytes at {remote:#x} lie in no region",
            peer.holder,
        )

    def _stream(self, peer: PeerRef) -> torch.cuda.Stream:
        with self._lock:
            if peer.session not in self._streams:
                self._streams[peer.session] = torch.cuda.Stream(device=self._device)
            return self._streams[peer.session]

    # --- transfers -------------------------------------------------------------------------

    def submit(self, op: Op, peer: PeerRef, local: int, remote: int, nbytes: int) -> Ticket:
        self.check_reachable(peer)
        mapped = self._translate(peer, remote, nbytes)
        src, dst = (mapped, local) if op is Op.READ else (local, mapped)
        stream = self._stream(peer)
        self._ensure_context()
        rc = self._cu.cuMemcpyAsync(dst, src, nbytes, ctypes.c_void_p(stream.cuda_stream))
        if rc != 0:
            raise TransferFailed(
                f"ipc {op.value}", peer.session, rc, f"cuMemcpyAsync of {nbytes} bytes", peer.holder
            )
        event = torch.cuda.Event()
        event.record(stream)
        return Ticket(peer=peer, op=op, nbytes=nbytes, handle=event)

    def poll(self, ticket: Ticket) -> Poll:
        if ticket.done or ticket.handle.query():
            ticket.done = True
            return Poll.DONE
        return Poll.PENDING

    def read_batch(
        self, peer: PeerRef, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]
    ) -> None:
        self._batch(Op.READ, peer, local, remote, lengths)

    def write_batch(
        self, peer: PeerRef, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]
    ) -> None:
        self._batch(Op.WRITE, peer, local, remote, lengths)

    def _batch(self, op: Op, peer: PeerRef, local, remote, lengths) -> None:
        tickets = [
            self.submit(op, peer, lo, re, n)
            for lo, re, n in zip(local, remote, lengths, strict=True)
        ]
        deadline = time.monotonic() + self.config.deadline_s(sum(lengths))
        while not all(self.poll(t) is Poll.DONE for t in tickets):
            if time.monotonic() > deadline:
                raise SourceTimeout(
                    f"ipc {op.value} of {sum(lengths)} bytes from {peer.holder} "
                    "did not finish by its deadline.",
                    op=f"ipc {op.value}",
                    peer=peer.session,
                    holder=peer.holder,
                )
            time.sleep(0.0002)

    def close(self) -> None:
        for ptr in self._bases:
            self._cu.cuIpcCloseMemHandle(ptr)  # best effort at exit
        self._opened.clear()
        self._bases.clear()
