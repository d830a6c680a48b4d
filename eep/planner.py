"""The runtime's placement planner, run by the membership coordinator.

``eep coordinator --planner eep.planner:from_cluster`` builds it from the cluster's runtime
config in etcd. For a view's members it returns the placement to serve: the home placement
when every slot is live, the survivors' repair after failures, a returning slot's home
experts after ``add_slot``; always a pure function of the previous placement and the members.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from eep.config import RuntimeConfig
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.view import View
from eep.placement import Placement, PlacementError, add_slot, initial_placement, repair

log = logging.getLogger(__name__)


def home_placement(cfg: RuntimeConfig, num_experts: int) -> Placement:
    return initial_placement(num_experts, cfg.num_slots, cfg.experts_per_slot)


def next_placement(home: Placement, members: Sequence[int], previous: View | None) -> dict:
    current = home
    if previous is not None and previous.placement is not None:
        current = _previous_placement(home, previous)
    live = set(members)
    if set(current.live) - live:
        current = repair(current, live & set(current.live)).placement
    for slot in sorted(live - set(current.live)):
        current = add_slot(current, slot).placement
    return current.to_json()


def _previous_placement(home: Placement, previous: View) -> Placement:
    """The placement of the previous view, or ``home`` when that view's payload is not a
    placement of this cluster's shape (written by hand, or by another cluster): planning
    from home still gives every member experts, where an exception would stop every commit."""
    try:
        placement = Placement.from_json(previous.placement)
    except (PlacementError, TypeError, ValueError, RecursionError) as exc:
        log.error("view %d: placement unreadable (%s); planning from home", previous.epoch, exc)
        return home
    shape = ("num_experts", "num_slots", "experts_per_slot", "max_replicas")
    if any(getattr(placement, f) != getattr(home, f) for f in shape):
        log.error("view %d: placement of another shape; planning from home", previous.epoch)
        return home
    return placement


def from_cluster(client: EtcdClient, keys: Keys):
    """The coordinator's planner factory: reads ``/eep/<cluster>/config`` once."""
    from eep.model.config import ModelConfig

    kv = client.get(keys.config)
    if kv is None:
        raise SystemExit(f"no runtime config at {keys.config}: start the cluster with eep launch")
    try:
        cfg = RuntimeConfig.from_json(kv.value)
    except ValueError as exc:
        raise SystemExit(f"{keys.config}: {exc}") from exc
    home = home_placement(cfg, ModelConfig.from_dir(cfg.model_path).num_experts)
    return lambda members, previous: next_placement(home, members, previous)
