"""Typed errors of the membership package.

Every error says what happened and what the user can do about it. External failures are
chained (``raise ... from exc``) so the etcd client's own message stays visible.
"""

from __future__ import annotations


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
