"""The etcd client of the project: KV, transactions and leases over etcd's v3 JSON gateway.

It speaks the gateway's JSON API directly (revisions in responses, compare-and-swap
transactions with several compares, watch headers and compaction notices), and turns every
failure into a typed error from ``errors``. A cluster of several members is given as several
endpoints; ``etcd_transport`` moves a request from a member that cannot serve to the next one,
and never repeats a write whose outcome is unknown.

Every request has a timeout; a request that times out has an unknown outcome, so writers that
care (the view commit) resolve it by re-reading, never by blindly repeating.

Here: the client (:class:`EtcdClient`). The watch stream (``etcd_watch``), the records the
client returns and the transaction builders (plain data in ``etcd_json``) are re-exported here
so that callers import everything etcd from this one module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .errors import EtcdRequestError
from .etcd_json import (
    Event,
    KeyValue,
    TxnResult,
    WatchBatch,
    b64,
    cmp_create,
    cmp_lease,
    cmp_mod,
    op_delete,
    op_get,
    op_put,
    prefix_end,
)
from .etcd_transport import Gateway
from .etcd_watch import WatchStream

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
# how long one member may take to answer a repeatable request before the next one is asked
# (doubled on every further pass over the members, within the request's timeout)
DEFAULT_ATTEMPT_S = 0.5


class EtcdClient:
    """A small, typed etcd v3 client over one or more endpoints (``host:port``, or one string
    of them separated by commas, as ``--etcd`` takes them).

    Requests go to one member and stay with it while it serves; a member that is down, stopped
    or without a leader costs at most ``attempt_s`` before the next one is asked (writes:
    see ``etcd_transport``). ``timeout_s`` bounds every unary request.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempt_s: float = DEFAULT_ATTEMPT_S,
    ):
        if isinstance(endpoints, str):
            endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
        self._gateway = Gateway(endpoints, timeout_s, min(attempt_s, timeout_s))
        self.endpoints = self._gateway.endpoints
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"EtcdClient({','.join(self.endpoints)})"

    @property
    def current_endpoint(self) -> str:
        """The endpoint requests go to now."""
        return self.endpoints[self._gateway.current]

    def _post(
        self,
        path: str,
        body: dict[str, Any],
        timeout_s: float | None = None,
        repeatable: bool = True,
    ) -> Any:
        return self._gateway.post(path, body, timeout_s, repeatable)

    # --- KV --------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        kvs, _ = self.range(key)
        return kvs[0] if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix``, sorted by key, and the store revision of the read."""
        return self.range(prefix, prefix_end(prefix))

    def range(self, key: str, range_end: str | None = None) -> tuple[list[KeyValue], int]:
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        result = self._post("kv/range", body)
        kvs = [KeyValue.from_json(kv) for kv in result.get("kvs", [])]
        return kvs, int(result["header"]["revision"])

    def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        """Write ``key``; returns the new store revision. A missing lease is an error."""
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = lease
        return int(self._post("kv/put", body, repeatable=False)["header"]["revision"])

    def delete(self, key: str, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many keys were deleted."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        return int(self._post("kv/deleterange", body, repeatable=False).get("deleted", 0))

    def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> TxnResult:
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        # a transaction that only reads (compares and ranges) may be repeated like a read
        reads_only = all("request_range" in op for op in (*success, *failure))
        result = self._post("kv/txn", body, repeatable=reads_only)
        responses = []
        for resp in result.get("responses", []):
            rng = resp.get("response_range")
            kvs = rng.get("kvs", []) if rng else []
            responses.append(tuple(KeyValue.from_json(kv) for kv in kvs))
        return TxnResult(
            succeeded=bool(result.get("succeeded", False)),
            revision=int(result["header"]["revision"]),
            responses=tuple(responses),
        )

    def compact(self, revision: int) -> None:
        self._post("kv/compaction", {"revision": revision, "physical": True}, repeatable=False)

    def revision(self) -> int:
        """The current store revision (a linearizable read)."""
        return self.range("\0")[1]

    # --- leases ----------------------------------------------------------------------------

    def lease_grant(self, ttl_s: int) -> tuple[int, int]:
        """Grant a lease; returns ``(lease_id, granted_ttl_s)`` (etcd may raise the TTL)."""
        result = self._post("lease/grant", {"TTL": int(ttl_s)})
        if result.get("error"):
            raise EtcdRequestError(f"etcd refused a lease of {ttl_s} s: {result['error']}")
        return int(result["ID"]), int(result["TTL"])

    def lease_keepalive(self, lease_id: int, timeout_s: float | None = None) -> int:
        """Renew a lease once; returns the new TTL, or -1 if the lease no longer exists.
        ``timeout_s`` (default: the client's) bounds the request, over every member tried."""
        result = self._post("lease/keepalive", {"ID": lease_id}, timeout_s=timeout_s)
        return int(result.get("result", {}).get("TTL", -1))

    def lease_revoke(self, lease_id: int) -> bool:
        """Revoke a lease (its keys are deleted in one revision); False if it was gone. Revoking
        is repeated like a read: a repeat whose first try landed unseen answers False."""
        try:
            self._post("kv/lease/revoke", {"ID": lease_id})
        except EtcdRequestError as exc:
            if "not found" in str(exc):
                return False
            raise
        return True

    def lease_ttl(self, lease_id: int) -> int:
        """Whole seconds left on a lease (0: under one), or -1 if it does not exist."""
        # proto3 JSON leaves a zero TTL out; a missing lease is an explicit -1
        return int(self._post("kv/lease/timetolive", {"ID": lease_id}).get("TTL", 0))

    # --- watch -----------------------------------------------------------------------------

    def watch(
        self, key: str, start_revision: int, prefix: bool = False, idle_s: float | None = None
    ) -> WatchStream:
        """Open a watch on ``key`` (or every key under it) from ``start_revision``; its member
        is probed after ``idle_s`` without a message (default: ``WatchStream``'s)."""
        return WatchStream(self._gateway, key, start_revision, prefix, idle_s)

    def close(self) -> None:
        self._gateway.close()


__all__ = [
    "EtcdClient",
    "Event",
    "KeyValue",
    "TxnResult",
    "WatchBatch",
    "WatchStream",
    "cmp_create",
    "cmp_lease",
    "cmp_mod",
    "op_delete",
    "op_get",
    "op_put",
    "prefix_end",
]
