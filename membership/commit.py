"""Committing views: one compare-and-swap transaction per epoch.

The transaction compares the ``view`` key's ``mod_revision`` with the one the decision was
based on, checks that ``views/<epoch>`` does not exist yet, and writes both keys, so epochs
never fork and every epoch has exactly one view. Extra compares (a coordinator's leadership)
fence the writer. A lost race re-reads and decides again. A request that times out has an
unknown outcome: it is resolved by re-reading the history key, never by writing twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import EtcdUnavailable, MembershipError, StaleView
from .etcd import EtcdClient, cmp_create, cmp_mod, op_put
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


def read_view(client: EtcdClient, keys: Keys) -> tuple[View | None, int]:
    """The committed view (``None`` before the first commit) and its ``mod_revision``."""
    kv = client.get(keys.view)
    if kv is None:
        return None, 0
    return View.from_json(kv.value, where=keys.view), kv.mod_revision


def read_history(client: EtcdClient, keys: Keys) -> list[View]:
    kvs, _ = client.get_prefix(keys.views)
    return [View.from_json(kv.value, where=kv.key) for kv in kvs]


def commit_next(
    client: EtcdClient,
    keys: Keys,
    decide: Decide,
    fence: Sequence[dict[str, Any]] = (),
    max_attempts: int = 20,
    resolve_timeout_s: float = 10.0,
) -> CommitResult:
    """Commit ``decide(current)`` as the next epoch; ``decide`` returning ``None`` means no
    change. Retries lost races up to ``max_attempts`` times."""
    for attempt in range(1, max_attempts + 1):
        current, revision = read_view(client, keys)
        proposed = decide(current)
        if proposed is None:
            return CommitResult(current, False, attempt)
        expected = current.epoch + 1 if current else 1
        if proposed.epoch != expected:
            raise StaleView(
                f"proposed epoch {proposed.epoch} does not follow the committed epoch "
                f"{expected - 1}; decide() must build on the view it is given."
            )
        payload = proposed.to_json()
        history_key = keys.view_at(proposed.epoch)
        compare = [cmp_mod(keys.view, revision), cmp_create(history_key, 0), *fence]
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
    raise StaleView(
        f"gave up committing after {max_attempts} lost races; is another writer "
        "committing without leadership?"
    )


def _landed(client: EtcdClient, history_key: str, payload: str, timeout_s: float) -> bool:
    """After an unknown outcome: wait for etcd to answer, then see whose view is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            kv = client.get(history_key)
            return kv is not None and kv.value.decode() == payload
        except EtcdUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _fence_holds(client: EtcdClient, fence: Sequence[dict[str, Any]]) -> bool:
    return client.txn(list(fence), []).succeeded
