"""Keep a native library's listening sockets on one address: loopback, or the host's own.

The Mooncake Transfer Engine's TCP transport (the CPU ranks' transfer service) binds its
handshake/RPC port and its data port to the wildcard address whatever address it is given
(``MC_TCP_BIND_ADDRESS`` only sets the address it advertises; Mooncake 0.3.13). The data port
reads and writes the worker's registered memory for whoever connects, so on a host with other
interfaces it must not listen there.

:func:`confine_binds` redirects the library's own calls to ``bind``: its global offset table
entry for ``bind`` (resolved by the dynamic linker at load) is pointed at a filter that turns a
wildcard address (``0.0.0.0``, ``::``) into the loopback one (``127.0.0.1``, ``::ffff:127.0.0.1``),
or into the host's address on a cluster of several hosts (the address its peers are given),
and passes every other address through unchanged. Nothing else of the process is touched:
Python's sockets and other libraries call ``bind`` through their own tables.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import mmap
import struct

log = logging.getLogger(__name__)

_AF_INET, _AF_INET6 = 2, 10
_SHT_RELA = 4
_R_X86_64_GLOB_DAT, _R_X86_64_JUMP_SLOT = 6, 7
_BIND = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
# no use_errno: ctypes would swap the thread's errno with a private copy around each call, and
# the library that called bind must see bind's own errno
_libc = ctypes.CDLL(None)
_libc.bind.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
_libc.bind.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int
_libc.__errno_location.restype = ctypes.POINTER(ctypes.c_int)
_patched: dict[str, object] = {}  # library path -> the callback its table now points at


_target = bytes((127, 0, 0, 1))  # the IPv4 address a wildcard bind becomes (one per process)


def _loopback_bind(fd: int, addr: int, length: int) -> int:
    raw = bytearray(ctypes.string_at(addr, length))
    family = struct.unpack_from("=H", raw, 0)[0]
    if family == _AF_INET and length >= 8 and raw[4:8] == b"\0\0\0\0":
        raw[4:8] = _target
    elif family == _AF_INET6 and length >= 24 and raw[8:24] == b"\0" * 16:
        raw[8:24] = b"\0" * 10 + b"\xff\xff" + _target
    buf = ctypes.create_string_buffer(bytes(raw), length)
    rc = _libc.bind(fd, buf, length)
    errno = _libc.__errno_location()[0]  # bind's, before the interpreter runs anything else
    _libc.__errno_location()[0] = errno  # and what the caller reads once this returns
    return rc


def _bind_slots(path: str) -> list[int]:
    """Offsets (from the load base) of ``path``'s table entries that resolve to ``bind``."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise RuntimeError(f"{path} is not a 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    slots = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if kind != _SHT_RELA:
            continue
        symtab = sections[link]
        strtab = sections[symtab[6]]
        for rel in range(offset, offset + size, 24):
            r_offset, r_info, _addend = struct.unpack_from("<QQq", data, rel)
            sym, rtype = r_info >> 32, r_info & 0xFFFFFFFF
            if not sym or rtype not in (_R_X86_64_GLOB_DAT, _R_X86_64_JUMP_SLOT):
                continue
            (st_name,) = struct.unpack_from("<I", data, symtab[4] + sym * 24)
            start = strtab[4] + st_name
            if data[start : data.index(b"\0", start)] == b"bind":
                slots.append(r_offset)
    return slots


def _loaded(suffix: str) -> tuple[int, str] | None:
    """``(base address, path)`` of the loaded library whose path ends with ``suffix``."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(suffix) and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16), parts[5]
    return None


def confine_binds(*suffixes: str, address: str = "127.0.0.1") -> list[str]:
    """Point the ``bind`` entries of each loaded library named by ``suffixes`` (path endings,
    e.g. ``"mooncake/engine.so"``) at the filter, which turns a wildcard bind into one on
    ``address`` (an IPv4 address of this host; the loopback one by default, the host's own
    address on a cluster of several hosts); returns the libraries patched. A library not
    loaded is a ``RuntimeError``: the caller loads it first. One address per process."""
    global _target
    _target = ipaddress.IPv4Address(address).packed
    done = []
    for suffix in suffixes:
        found = _loaded(suffix)
        if found is None:
            raise RuntimeError(f"{suffix} is not loaded in this process")
        base, path = found
        if path in _patched:
            done.append(path)
            continue
        callback = _BIND(_loopback_bind)
        target = ctypes.cast(callback, ctypes.c_void_p).value
        for offset in _bind_slots(path):
            slot = base + offset
            page = slot & ~(mmap.PAGESIZE - 1)
            if _libc.mprotect(page, mmap.PAGESIZE, 3) != 0:  # the table may be read-only
                raise OSError(_libc.__errno_location()[0], f"mprotect of {path}'s table failed")
            ctypes.c_void_p.from_address(slot).value = target
        _patched[path] = callback  # kept alive as long as the library may call it
        done.append(path)
        log.debug("%s: bind confined to %s", path, address)
    return done
