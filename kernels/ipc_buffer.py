"""``IpcEpBuffer``: the ``symm`` fabric's receive buffer, shared with peers over CUDA IPC.

Unlike torch symmetric memory (``symm_buffer.py``), nothing here is collective: each rank
allocates its own buffer (``cuMemAlloc``, its own allocation, zeroed before it is exported),
exports one IPC handle (:meth:`export`, published in etcd by the runtime), and maps a peer's
buffer when a view first names that peer's incarnation (:meth:`map_peer`). The mapping's
address goes into ``peer_base[slot]`` in place, so a captured graph keeps working and a
restarted slot (a new process, a new buffer) is taken back without touching the others.

A dead peer's buffer stays mapped (an IPC mapping keeps the exporter's memory alive), so a
survivor's stores into it never fault; the runtime closes that mapping when the slot's next
incarnation replaces it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from eep.cuda_driver import (
    HANDLE_BYTES,
    LAZY_ENABLE_PEER_ACCESS,
    IpcHandle,
    cuda_error,
    load_driver,
)
from eep.kernels.config import EpConfig
from eep.kernels.fabric import EpFabric, FabricLayout
from eep.kernels.view import DeviceView


class IpcError(RuntimeError):
    """A CUDA driver call of the IPC buffer failed."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise IpcError(f"{what} failed: {cuda_error(rc)}")


class _DeviceBytes:
    """A raw device allocation seen by torch through the CUDA array interface."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


@dataclass(frozen=True)
class Exported:
    """What a peer needs to map this rank's buffer (JSON-able via :meth:`to_json`)."""

    handle: str  # hex of the 64-byte cudaIpcMemHandle
    nbytes: int
    pid: int

    def to_json(self) -> dict:
        return {"handle": self.handle, "nbytes": self.nbytes, "pid": self.pid}

    @classmethod
    def from_json(cls, raw: dict) -> Exported:
        handle, nbytes = str(raw["handle"]), int(raw["nbytes"])
        if len(handle) != 2 * HANDLE_BYTES:
            raise ValueError(f"IPC handle must be {2 * HANDLE_BYTES} hex digits")
        return cls(handle, nbytes, int(raw.get("pid", 0)))


class IpcEpBuffer(EpFabric):
    """``EpFabric`` of ``rank`` over buffers shared by CUDA IPC. ``peer_base`` starts with only
    this rank's own address; a peer is usable once :meth:`map_peer` gave its address."""

    def __init__(
        self, cfg: EpConfig, rank: int, view: DeviceView, device: torch.device | str
    ) -> None:
        device = torch.device(device)
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)  # the primary context exists and is current
        nbytes = FabricLayout.for_config(cfg).nbytes
        cu = load_driver()
        ptr = ctypes.c_uint64()
        _check(cu.cuMemAlloc_v2(ctypes.byref(ptr), nbytes), f"cuMemAlloc({nbytes})")
        self._own = ptr.value
        _check(cu.cuMemsetD8_v2(self._own, 0, nbytes), "cuMemsetD8")  # flags start at 0
        _check(cu.cuCtxSynchronize(), "cuCtxSynchronize")
        handle = IpcHandle()
        _check(cu.cuIpcGetMemHandle(ctypes.byref(handle), self._own), "cuIpcGetMemHandle")
        self.exported = Exported(bytes(handle.reserved).hex(), nbytes, os.getpid())
        buf = torch.as_tensor(_DeviceBytes(self._own, nbytes), device=device)
        peer_base = torch.zeros(cfg.num_slots, dtype=torch.int64, device=device)
        peer_base[rank] = self._own
        self._mapped: dict[int, tuple[str, int]] = {}  # slot -> (handle, mapped address)
        super().__init__(cfg, rank, view, buf, peer_base)

    def export(self) -> dict:
        return self.exported.to_json()

    def mapped(self, slot: int) -> str | None:
        """The handle currently mapped for ``slot`` (``None``: not mapped)."""
        return self._mapped[slot][0] if slot in self._mapped else None

    def map_peer(self, slot: int, exported: dict | Exported) -> None:
        """Maps ``slot``'s buffer and writes its address into ``peer_base[slot]`` (in place).
        A mapping it replaces is closed after the device finished every queued kernel."""
        if slot == self.rank:
            raise ValueError(f"slot {slot} is this rank; its own buffer needs no mapping")
        exp = exported if isinstance(exported, Exported) else Exported.from_json(exported)
        if exp.nbytes != self.layout.nbytes:
            raise IpcError(
                f"slot {slot}'s buffer has {exp.nbytes} bytes, this rank's {self.layout.nbytes}: "
                "the slots disagree on the fabric config (experts per slot, hidden, max tokens)"
            )
        if self.mapped(slot) == exp.handle:
            return
        cu = load_driver()
        handle = IpcHandle.from_buffer_copy(bytes.fromhex(exp.handle))
        ptr = ctypes.c_uint64()
        rc = cu.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), handle, LAZY_ENABLE_PEER_ACCESS)
        _check(rc, f"cuIpcOpenMemHandle (slot {slot}, pid {exp.pid})")
        old = self._mapped.get(slot)
        self.peer_base[slot] = ptr.value
        self._mapped[slot] = (exp.handle, ptr.value)
        if old is not None:
            torch.cuda.synchronize(self.buf.device)  # no queued kernel still uses the old one
            _check(cu.cuIpcCloseMemHandle(old[1]), f"cuIpcCloseMemHandle (slot {slot})")

    def close(self) -> None:
        """Unmaps every peer and frees this rank's buffer (call once no peer still stores)."""
        cu = load_driver()
        torch.cuda.synchronize(self.buf.device)
        for _, addr in self._mapped.values():
            cu.cuIpcCloseMemHandle(addr)
        self._mapped.clear()
        if self._own:
            cu.cuMemFree_v2(self._own)
            self._own = 0
