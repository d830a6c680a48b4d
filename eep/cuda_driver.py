"""The CUDA driver (``libcuda``) through ctypes: the calls this project makes without torch.

Two users share it: the ``symm`` fabric's receive buffers (``eep.kernels.ipc_buffer``: its own
allocation, exported and mapped over CUDA IPC) and the transfer service's intra-host path
(``eep.transfer.ipc``: arenas exported, peers' arenas mapped and copied from). It is a leaf:
it imports nothing of the project, so both layers can use it.
"""

from __future__ import annotations

import ctypes
import functools

HANDLE_BYTES = 64  # a CUipcMemHandle is 64 opaque bytes
LAZY_ENABLE_PEER_ACCESS = 1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS


class CudaDriverMissing(RuntimeError):
    """``libcuda.so.1`` could not be loaded (no NVIDIA driver on this machine)."""


class IpcHandle(ctypes.Structure):
    """A ``CUipcMemHandle`` (64 opaque bytes)."""

    _fields_ = [("reserved", ctypes.c_ubyte * HANDLE_BYTES)]  # c_char would stop at NUL


@functools.cache
def load_driver():
    """``libcuda`` with the signature of every call made through it; loaded once.

    Raises :class:`CudaDriverMissing` where the driver is not installed."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise CudaDriverMissing(
            "CUDA IPC needs the CUDA driver (libcuda.so.1); none found."
        ) from exc
    u64, p = ctypes.c_uint64, ctypes.POINTER
    sigs = {
        "cuMemGetAddressRange_v2": [p(u64), p(ctypes.c_size_t), u64],
        "cuMemAlloc_v2": [p(u64), ctypes.c_size_t],
        "cuMemFree_v2": [u64],
        "cuMemsetD8_v2": [u64, ctypes.c_ubyte, ctypes.c_size_t],
        "cuIpcGetMemHandle": [p(IpcHandle), u64],
        "cuIpcOpenMemHandle_v2": [p(u64), IpcHandle, ctypes.c_uint],
        "cuIpcCloseMemHandle": [u64],
        "cuMemcpyAsync": [u64, u64, ctypes.c_size_t, ctypes.c_void_p],
        "cuCtxGetCurrent": [p(ctypes.c_void_p)],
        "cuCtxSetCurrent": [ctypes.c_void_p],
        "cuCtxSynchronize": [],
        "cuDevicePrimaryCtxRetain": [p(ctypes.c_void_p), ctypes.c_int],
        "cuGetErrorString": [ctypes.c_int, p(ctypes.c_char_p)],
    }
    for name, args in sigs.items():
        fn = getattr(cuda, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return cuda


def cuda_error(rc: int) -> str:
    """``CUDA error <rc> (<driver's text>)``."""
    msg = ctypes.c_char_p()
    load_driver().cuGetErrorString(rc, ctypes.byref(msg))
    return f"CUDA error {rc} ({(msg.value or b'?').decode()})"
