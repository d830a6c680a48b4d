"""Typed errors of the membership package.

Every error says what happened and what the user can do about it. External failures are
chained (``raise ... from exc``) so the etcd client's own message stays visible.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from typing import Any


class MembershipError(Exception):
    """Base class of every error raised by ``eep.membership``."""


class EtcdUnavailable(MembershipError):
    """No etcd endpoint answered within the timeout."""


class EtcdRequestError(MembershipError):
    """etcd answered, but refused the request (bad argument, missing lease, ...)."""


class LeaseLost(MembershipError):
    """The session's lease expired or was revoked: the owner must stop acting for its slot."""


class Fenced(LeaseLost):
    """The session passed its self-fence deadline without a successful renewal."""


class LeaseExpiredInOutage(LeaseLost):
    """The lease ran out while etcd could not be reached and the owner was still making
    progress: an outage, not a hang. A slot supervisor may re-attach its record under a new
    lease (``SlotRegistration.reattach``) if the committed view still lists it."""


class Excluded(LeaseLost):
    """The committed view no longer lists this incarnation (or a newer one holds the slot):
    it must stop serving for good."""


class StaleView(MembershipError):
    """A view was based on an epoch that is no longer the committed one."""


class MalformedView(MembershipError):
    """A view read from etcd (or given to the codec) does not decode or validate."""


class SlotTaken(MembershipError):
    """Another live process holds the slot's registration."""


class WatchCompacted(MembershipError):
    """The watched revision was compacted away; the watcher must re-read and re-watch."""


class WatchBroken(MembershipError):
    """The watch stream ended or failed; the watcher must resume from its last revision."""


class MalformedRecord(MembershipError):
    """A record read from etcd (a slot record, an incarnation counter, a key's name) does not
    decode or validate. Readers log it once per revision and treat the key as absent."""


# --- strict decoding of what etcd holds -------------------------------------------------------
#
# Anything under /eep/ may have been written by hand or by another program. Decoding is total:
# it returns a checked value or raises the caller's typed error naming the key, never anything
# else (json's RecursionError on deep nesting, an int() of a string, a bool taken for an int).

# etcd's lease ids and revisions, and the status block's 8-byte words, are signed 64-bit
INT64_MAX = 2**63 - 1


def strict_json(raw: bytes | str) -> Any:
    """JSON with no NaN or Infinity and no number that overflows a float: what etcd values
    (here) and request bodies (the front-end's API) are read with. Raises ``ValueError``
    (``JSONDecodeError`` and ``UnicodeDecodeError`` included) or ``RecursionError``."""
    return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)


def decode_object(raw: bytes | str, where: str, error: type[MembershipError]) -> dict[str, Any]:
    """``raw`` as a JSON object: UTF-8, no NaN or Infinity, bounded nesting."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        obj = strict_json(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise error(f"{where} is not JSON ({_short(exc)}): {clip(raw)}") from None
    if not isinstance(obj, dict):
        raise error(f"{where} must be a JSON object, got {type(obj).__name__}: {clip(raw)}")
    return obj


def check_int(
    obj: dict[str, Any], name: str, where: str, error: type[MembershipError], lo: int = 0
) -> int:
    """``obj[name]`` as an int in ``[lo, INT64_MAX]`` (a JSON ``true`` is not an int here)."""
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{where}: {name} must be an integer, got {clip(value)}.")
    if not lo <= value <= INT64_MAX:
        raise error(f"{where}: {name} must be in [{lo}, 2**63 - 1], got {clip(value)}.")
    return value


def check_type(
    obj: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str, error: type
) -> Any:
    """``obj[name]`` if it is a ``kind`` (bool is never a number here)."""
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise error(f"{where}: {name} must be a {names}, got {clip(value)}.")
    return value


def check_slots(
    obj: dict[str, Any],
    name: str,
    where: str,
    error: type[MembershipError],
    num_slots: int | None = None,
) -> tuple[int, ...]:
    """``obj[name]`` as a tuple of slot numbers: a JSON list of integers in ``[0, INT64_MAX]``
    (below ``num_slots`` where known), sorted and without duplicates."""
    value = check_type(obj, name, list, where, error)
    top = INT64_MAX if num_slots is None else num_slots - 1
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= top:
            raise error(f"{where}: {name} must be slot numbers in [0, {top}], got {clip(s)}.")
    if any(a >= b for a, b in zip(value, value[1:], strict=False)):
        raise error(f"{where}: {name} must be sorted and unique, got {clip(value)}.")
    return tuple(value)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} does not fit a float")
    return value


def _short(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]


def clip(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MalformedLog:
    """Reports each malformed key once per revision of it.

    Readers that loop (the coordinator reconciles every second) meet the same bad value many
    times; one line per revision says what is wrong without flooding the log.
    """

    def __init__(self, limit: int = 4096):
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def warn(self, logger: logging.Logger, key: str, revision: int, problem: str) -> bool:
        """Log ``problem`` unless this revision of ``key`` was reported; True if logged."""
        with self._lock:
            if self._seen.get(key) == revision:
                return False
            if len(self._seen) >= self._limit:
                self._seen.clear()
            self._seen[key] = revision
        logger.warning("%s; ignoring it (treated as absent) until it is rewritten", problem)
        return True


MALFORMED = MalformedLog()
