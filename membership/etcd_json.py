"""The JSON of etcd's v3 gateway: base64 keys and values, the records it returns (a key's
:class:`KeyValue`, watch events, transaction results) and the compares and operations that
make up a transaction. Pure data, no I/O: :mod:`.etcd` sends and receives these.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any


def b64(data: str | bytes) -> str:
    """``data`` (text is UTF-8 encoded) as the base64 text the gateway wants for keys/values."""
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def unb64(data: str | None) -> bytes:
    """The bytes of a base64 field of a gateway response (absent: empty)."""
    return base64.b64decode(data) if data else b""


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with ``prefix``."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd stores it; revisions are etcd's, ``lease`` 0 means none."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            key=unb64(kv.get("key")).decode(),
            value=unb64(kv.get("value")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True, slots=True)
class Event:
    """A watch event: ``kind`` is ``"put"`` or ``"delete"``; ``kv.mod_revision`` orders it."""

    kind: str
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """The events of one watch response, all at revisions <= ``revision``."""

    revision: int
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    # for each op of the branch taken: the KeyValues a range returned ([] for put/delete)
    responses: tuple[tuple[KeyValue, ...], ...] = field(default_factory=tuple)


# --- transaction builders (compare targets: MOD, CREATE, VERSION, VALUE, LEASE) -------------


def cmp_mod(key: str, revision: int, result: str = "EQUAL") -> dict[str, Any]:
    """Compare a key's ``mod_revision`` (0 for a missing key)."""
    return {"key": b64(key), "target": "MOD", "result": result, "mod_revision": revision}


def cmp_create(key: str, revision: int, result: str = "EQUAL") -> dict[str, Any]:
    """Compare a key's ``create_revision`` (0 for a missing key)."""
    return {"key": b64(key), "target": "CREATE", "result": result, "create_revision": revision}


def cmp_lease(key: str, lease_id: int, result: str = "EQUAL") -> dict[str, Any]:
    return {"key": b64(key), "target": "LEASE", "result": result, "lease": lease_id}


def op_put(key: str, value: str | bytes, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


def op_get(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def op_delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}
