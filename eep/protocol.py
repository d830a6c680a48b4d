"""The rank <-> front-end protocol: typed messages, versioned, in length-prefixed msgpack frames.

Both sides import this module and nothing else to talk to each other (it needs no torch: the
front-end does not load it). A frame is a 4-byte big-endian length, then one msgpack map: the
message's fields and ``"type"``, its wire name. :func:`decode` checks every field's type
against the message's dataclass, so a malformed or unknown frame raises :class:`FrameError`
(the link is dropped) instead of a ``KeyError`` somewhere in the handler.

The front-end opens each link with :class:`Challenge`; the rank answers with :class:`Hello`,
which carries :data:`PROTOCOL_VERSION` and ``eep.auth.proof`` of the nonce under the cluster's
secret. The front-end drops a link of another version or with a wrong proof. The challenge also
names the front-end's ``instance`` (random per process): a rank whose link comes back to
another instance drops every request the previous one gave it, since no one is left to read
their tokens.

The messages, by direction:

=================  ==========================  ============================================
message            direction                   meaning
=================  ==========================  ============================================
``Challenge``      front-end -> rank, first    a fresh nonce the hello must answer, and
                                               which front-end process this is
``Hello``          rank -> front-end           this link is ``(slot, incarnation)``, with
                                               the proof that the rank knows the secret
``Tokens``         rank -> front-end           tokens emitted in one step
``MigrateReady``   rank -> front-end           a request stopped here, its KV lent for a move
``Migrated``       rank -> front-end           a moved request was taken over (KV read or not)
``Refused``        rank -> front-end           the rank cannot run a request (it names why)
``Submit``         front-end -> rank           run a request (fresh, re-queued or migrated)
``Abort``          front-end -> rank           drop a request
``MigrateOut``     front-end -> rank           hand a request to slot ``to`` with its KV
``Release``        front-end -> rank           the receiver read the lent KV: free it
=================  ==========================  ============================================
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack

PROTOCOL_VERSION = 4
MAX_FRAME = 64 << 20
_LEN = struct.Struct(">I")


class FrameError(Exception):
    """A frame that is too large, does not decode, or is not a valid message."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a request's tokens are drawn (``eep.engine.sampling`` draws them): greedy when
    ``temperature == 0``, else seeded by ``(seed, index)`` so a re-run draws the same tokens.
    ``top_k`` 0 keeps every token. A token of ``stop_token_ids`` (the request's, and the
    model's end-of-sequence ids) ends the request with ``stop``; stop strings are the
    front-end's (they need the text)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}.")


@dataclass(frozen=True, slots=True)
class KvHandoff:
    """Where a migrating request's KV blocks are, for the receiver to read and verify."""

    holder: str  # the lender's manifest name (its slot)
    blocks: list[int]
    checksums: list[str]  # one per block, as transfer.checksum writes them
    num_computed: int


# --- rank -> front-end ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    slot: int
    incarnation: int
    proof: str = ""  # eep.auth.proof(secret, nonce, slot, incarnation)
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Refused:
    """The rank will not run request ``id``: ``reason`` says why, for the client."""

    TYPE: ClassVar[str] = "refused"
    id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Tokens:
    """One step's tokens: rows of ``(request id, index, token, finish reason or None)``."""

    TYPE: ClassVar[str] = "tokens"
    slot: int
    events: list[tuple[str, int, int, str | None]]


@dataclass(frozen=True, slots=True)
class MigrateReady:
    """The request stopped on this rank; ``kv`` lends its blocks (None: nothing computed yet,
    the receiver starts it afresh); ``outputs`` are the tokens the rank has emitted."""

    TYPE: ClassVar[str] = "migrate_ready"
    id: str
    to: int
    kv: KvHandoff | None = None
    outputs: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Migrated:
    TYPE: ClassVar[str] = "migrated"
    id: str
    ok: bool  # False: the KV could not be read and is recomputed


# --- front-end -> rank ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """A fresh ``nonce`` for the rank's proof, and the front-end process's ``instance``: an id
    drawn when it starts, the same on each of its links (a restarted front-end has another)."""

    TYPE: ClassVar[str] = "challenge"
    nonce: str
    instance: str


@dataclass(frozen=True, slots=True)
class Submit:
    """Run a request: ``emitted`` tokens are already streamed (a re-queued or moved request
    continues after them); ``kv``, when moved, says where its KV blocks are."""

    TYPE: ClassVar[str] = "request"
    id: str
    prompt: list[int]
    emitted: list[int]
    params: SamplingParams
    kv: KvHandoff | None = None


@dataclass(frozen=True, slots=True)
class Abort:
    TYPE: ClassVar[str] = "abort"
    id: str


@dataclass(frozen=True, slots=True)
class MigrateOut:
    TYPE: ClassVar[str] = "migrate_out"
    id: str
    to: int


@dataclass(frozen=True, slots=True)
class Release:
    TYPE: ClassVar[str] = "release"
    id: str


ToFrontend = Union[Hello, Tokens, MigrateReady, Migrated, Refused]  # noqa: UP007 (a runtime value)
ToRank = Union[Challenge, Submit, Abort, MigrateOut, Release]  # noqa: UP007
Message = Union[ToFrontend, ToRank]  # noqa: UP007
MESSAGES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Tokens,
        MigrateReady,
        Migrated,
        Refused,
        Challenge,
        Submit,
        Abort,
        MigrateOut,
        Release,
    )
}


# --- values <-> wire -----------------------------------------------------------------------


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    return value


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_HINTS: dict[type, dict[str, Any]] = {}


def _from_wire(value: Any, hint: Any, where: str) -> Any:
    """``value`` as decoded from msgpack, checked against ``hint`` and converted (lists to
    tuples where the dataclass says tuple, maps to nested dataclasses)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _from_wire(value, option, where)
            except FrameError as exc:
                errors.append(str(exc))
        raise FrameError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise FrameError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        if origin is list:
            return [_from_wire(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_wire(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise FrameError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(
            _from_wire(v, a, f"{where}[{i}]")
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is float:
        if type(value) not in (int, float):
            raise FrameError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if type(value) is not hint:  # bool is not an int here, nor an int a bool
        raise FrameError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, body: Any, where: str) -> Any:
    if not isinstance(body, dict):
        raise FrameError(f"{where}: expected a map, got {type(body).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(body) - names
    if unknown:
        raise FrameError(f"{where}: unknown fields {sorted(map(str, unknown))}")
    values = {k: _from_wire(v, hints[k], f"{where}.{k}") for k, v in body.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # a missing field, or a value the class refuses
        raise FrameError(f"{where}: {exc}") from exc


def encode(msg: Message) -> bytes:
    """One frame holding ``msg``."""
    body = _to_wire(msg)
    body["type"] = msg.TYPE
    data = msgpack.packb(body, use_bin_type=True)
    return _LEN.pack(len(data)) + data


def decode(body: bytes) -> Message:
    """The message in one frame's body; :class:`FrameError` if it is not a valid one."""
    try:
        obj = msgpack.unpackb(body, raw=False)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as exc:
        # TypeError: e.g. a map whose keys mix bytes and str
        raise FrameError(f"undecodable frame: {exc}") from exc
    if not isinstance(obj, dict):
        raise FrameError("a frame must hold a map")
    kind = obj.pop("type", None)
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FrameError(f"unknown message type {kind!r}; known: {sorted(MESSAGES)}")
    return _build(cls, obj, kind)


# --- frames on sockets ---------------------------------------------------------------------


def _check_len(n: int) -> int:
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return n


async def read_message(reader: asyncio.StreamReader) -> Message:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return decode(await reader.readexactly(_check_len(n)))


def recv_message(sock: socket.socket) -> Message | None:
    """Blocking read of one message; ``None`` when the peer closed the connection."""
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    body = _recv_exact(sock, _check_len(_LEN.unpack(head)[0]))
    return None if body is None else decode(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
