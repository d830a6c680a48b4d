"""Committing views: one compare-and-swap transaction per epoch.

The transaction compares the ``view`` key's ``mod_revision`` with the one the decision was
based on, checks that ``views/<epoch>`` does not exist yet, and writes both keys, so epochs
never fork and every epoch has exactly one view. Extra compares (a coordinator's leadership)
fence the writer. A lost race re-reads and decides again. A request that times out has an
unknown outcome: it is resolved by re-reading the history key, never by writing twice.

The history is what was committed: the ``view`` key is only the pointer to its newest entry,
and a ``view`` that ``views/<epoch>`` does not hold byte for byte was not committed by anyone
(see :func:`read_committed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import (
    MALFORMED,
    EtcdUnavailable,
    MalformedRecord,
    MalformedView,
    MembershipError,
    StaleView,
)
from .etcd import EtcdClient, KeyValue, cmp_create, cmp_mod, op_delete, op_get, op_put
from .keys import Keys
from .view import View

log = logging.getLogger(__name__)

Decide = Callable[[View | None], View | None]


class FenceFailed(MembershipError):
    """A fencing compare (e.g. the writer's leadership) failed: the writer must stop."""


@dataclass(frozen=True, slots=True)
class CommitResult:
    view: View | None  # the committed view after the call (ours or the one we found)
    committed: bool  # whether this call committed a new epoch
    attempts: int


@dataclass(frozen=True, slots=True)
class Committed:
    """What the history says is committed, and what the next commit compares and writes."""

    view: View | None  # the newest committed view; None before the first commit
    view_revision: int  # the ``view`` key's mod_revision as read (0: absent)
    read_revision: int  # the store revision of the first read: watch from the one after
    next_epoch: int  # the epoch the next commit takes
    raw: bytes | None = None  # the history bytes of ``view``
    pointer_ok: bool = True  # whether the ``view`` key holds exactly those bytes


def read_committed(
    client: EtcdClient, keys: Keys, scan: bool = False, problems: dict[str, str] | None = None
) -> Committed:
    """The committed view: the ``view`` key when ``views/<its epoch>`` holds the same bytes
    (the commit writes both in one transaction), else the newest well-formed entry of the
    history. A ``view`` the history does not hold (garbage, a hand-written or huge epoch) is
    reported and ignored. ``scan`` reads the history even when ``view`` checks out (after a
    lost race, in case the next epoch's key is taken by garbage). Problems go to
    ``problems`` when given, else to the log (once per revision)."""
    kvs, read_revision = client.range(keys.view)
    kv = kvs[0] if kvs else None
    if kv is not None and not scan:
        try:
            view = View.from_json(kv.value, where=keys.view)
        except MalformedView as exc:
            _report(problems, kv, str(exc))
        else:
            # one round trip: the view's own history entry, and that none follows it
            here, after = keys.view_at(view.epoch), keys.view_at(view.epoch + 1)
            res = client.txn([], [op_get(here), op_get(after)])
            entry = res.responses[0][0] if res.responses and res.responses[0] else None
            followed = len(res.responses) > 1 and bool(res.responses[1])
            if entry is not None and entry.value == kv.value and not followed:
                return Committed(view, kv.mod_revision, read_revision, view.epoch + 1, kv.value)
            if followed:
                problem = f"{keys.view} holds epoch {view.epoch}, but the history has {after}"
            else:
                state = "different" if entry else "absent"
                problem = (
                    f"{keys.view} holds epoch {view.epoch}, which the history does not hold "
                    f"({here} is {state})"
                )
            _report(problems, kv, problem)
    return _from_history(client, keys, kv, read_revision, problems)


def _from_history(
    client: EtcdClient,
    keys: Keys,
    pointer: KeyValue | None,
    read_revision: int,
    problems: dict[str, str] | None,
) -> Committed:
    kvs, _ = client.get_prefix(keys.views)
    taken: set[int] = set()
    newest: tuple[View, bytes] | None = None
    for kv in kvs:
        try:
            epoch = keys.epoch_of(kv.key)
        except MalformedRecord as exc:
            _report(problems, kv, str(exc))
            continue
        taken.add(epoch)
        try:
            view = parse_entry(kv, epoch)
        except MalformedView as exc:
            _report(problems, kv, str(exc))
            continue
        if newest is None or epoch > newest[0].epoch:
            newest = (view, kv.value)
    # an epoch whose history key holds garbage is spent: the next commit goes above it
    epoch = newest[0].epoch + 1 if newest else 1
    while epoch in taken:
        epoch += 1
    revision = pointer.mod_revision if pointer else 0
    if newest is None:
        return Committed(None, revision, read_revision, epoch, None, pointer is None)
    view, raw = newest
    pointer_ok = pointer is not None and pointer.value == raw
    return Committed(view, revision, read_revision, epoch, raw, pointer_ok)


def parse_entry(kv: KeyValue, epoch: int) -> View:
    """The view of the history key ``kv`` (``views/<epoch>``); it must be of that epoch."""
    view = View.from_json(kv.value, where=kv.key)
    if view.epoch != epoch:
        raise MalformedView(f"{kv.key} holds a view of epoch {view.epoch}")
    return view


def _report(problems: dict[str, str] | None, kv: KeyValue, problem: str) -> None:
    if problems is not None:
        problems[kv.key] = problem
    else:
        MALFORMED.warn(log, kv.key, kv.mod_revision, problem)


def read_view(client: EtcdClient, keys: Keys) -> tuple[View | None, int]:
    """The committed view (``None`` before the first commit; see :func:`read_committed`)
    and the ``view`` key's ``mod_revision``."""
    state = read_committed(client, keys)
    return state.view, state.view_revision


def read_history(
    client: EtcdClient, keys: Keys, problems: dict[str, str] | None = None
) -> list[View]:
    """Every well-formed view of the history, in epoch order; malformed entries (and those
    whose key names another epoch) are reported and left out."""
    kvs, _ = client.get_prefix(keys.views)
    views = []
    for kv in kvs:
        try:
            views.append(parse_entry(kv, keys.epoch_of(kv.key)))
        except (MalformedView, MalformedRecord) as exc:
            _report(problems, kv, str(exc))
    return sorted(views, key=lambda v: v.epoch)


def commit_next(
    client: EtcdClient,
    keys: Keys,
    decide: Decide,
    fence: Sequence[dict[str, Any]] = (),
    max_attempts: int = 20,
    resolve_timeout_s: float = 10.0,
) -> CommitResult:
    """Commit ``decide(current)`` as the next epoch; ``decide`` returning ``None`` means no
    change. Retries lost races up to ``max_attempts`` times.

    ``decide`` builds on the committed view (:func:`read_committed`), so a ``view`` key that
    the history does not hold is overwritten by the commit, or, when there is nothing to
    commit, restored from the history (both compared on its revision and fenced)."""
    scan = False
    for attempt in range(1, max_attempts + 1):
        state = read_committed(client, keys, scan=scan)
        current = state.view
        proposed = decide(current)
        if proposed is None:
            if not state.pointer_ok:
                _restore(client, keys, state, fence)
            return CommitResult(current, False, attempt)
        expected = current.epoch + 1 if current else 1
        if proposed.epoch != expected:
            raise StaleView(
                f"proposed epoch {proposed.epoch} does not follow the committed epoch "
                f"{expected - 1}; decide() must build on the view it is given."
            )
        if state.next_epoch != expected:  # history keys holding garbage spent these epochs
            proposed = replace(proposed, epoch=state.next_epoch)
        payload = proposed.to_json()
        history_key = keys.view_at(proposed.epoch)
        compare = [cmp_mod(keys.view, state.view_revision), cmp_create(history_key, 0), *fence]
        try:
            res = client.txn(compare, [op_put(keys.view, payload), op_put(history_key, payload)])
        except EtcdUnavailable:
            if _landed(client, history_key, payload, resolve_timeout_s):
                log.info(
                    "epoch %d: commit outcome was unknown; re-read shows it landed", proposed.epoch
                )
                return CommitResult(proposed, True, attempt)
            continue
        if res.succeeded:
            return CommitResult(proposed, True, attempt)
        if fence and not _fence_holds(client, fence):
            raise FenceFailed(f"epoch {proposed.epoch}: fence compare failed; not committing")
        log.debug(
            "epoch %d: lost the commit race (attempt %d); re-reading", proposed.epoch, attempt
        )
        scan = True
    raise StaleView(
        f"gave up committing after {max_attempts} lost races; is another writer "
        "committing without leadership?"
    )


def _restore(
    client: EtcdClient, keys: Keys, state: Committed, fence: Sequence[dict[str, Any]]
) -> None:
    """Point ``view`` at the newest history entry again (delete it if there is none)."""
    op = op_put(keys.view, state.raw) if state.raw is not None else op_delete(keys.view)
    res = client.txn([cmp_mod(keys.view, state.view_revision), *fence], [op])
    if res.succeeded:
        epoch = state.view.epoch if state.view else None
        log.warning("%s restored from the history (epoch %s)", keys.view, epoch)


def _landed(client: EtcdClient, history_key: str, payload: str, timeout_s: float) -> bool:
    """After an unknown outcome: wait for etcd to answer, then see whose view is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            kv = client.get(history_key)
            return kv is not None and kv.value == payload.encode()
        except EtcdUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _fence_holds(client: EtcdClient, fence: Sequence[dict[str, Any]]) -> bool:
    return client.txn(list(fence), []).succeeded
