"""msgpack frames between processes: a 4-byte big-endian length, then one msgpack map.

Front-end -> rank: ``{"type": "request", "id", "prompt", "emitted", "params"}`` and
``{"type": "abort", "id"}``. Rank -> front-end: ``{"type": "hello", "slot", "incarnation"}``
and ``{"type": "tokens", "events": [[id, index, token, finish_reason or None], ...]}``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

MAX_FRAME = 64 << 20
_LEN = struct.Struct(">I")


class FrameError(Exception):
    """A frame that is too large or does not decode: the link is dropped."""


def encode(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def _decode(body: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.exceptions.ExtraData) as exc:
        raise FrameError(f"undecodable frame: {exc}") from exc
    if not isinstance(msg, dict) or "type" not in msg:
        raise FrameError("a frame must be a map with a 'type'")
    return msg


def _check_len(n: int) -> int:
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return n


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return _decode(await reader.readexactly(_check_len(n)))


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """Blocking read of one frame; ``None`` when the peer closed the connection."""
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    body = _recv_exact(sock, _check_len(_LEN.unpack(head)[0]))
    if body is None:
        return None
    return _decode(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
