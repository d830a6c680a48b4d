"""Expert placement: which slot holds which experts, planned purely and deterministically.

Glossary:
- *logical expert* ``e`` in ``[0, num_experts)``: what the router names.
- *physical expert* ``p`` in ``[0, num_slots * experts_per_slot)``: one position of one slot's
  expert arena; slot ``p // experts_per_slot``, local index ``p % experts_per_slot``.
- ``phy2log[p]``: the logical expert at ``p`` (``-1`` = empty); ``log2phy[e]``: the physical
  replicas of ``e`` in increasing order, ``-1`` padded to ``max_replicas`` (a fixed width, so
  the device tensors the kernels read keep their shape across views).
- *orphaned expert*: one with no replica on a live slot.
- *home*: the initial placement; a slot that comes back gets its home experts again.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any


class PlacementError(ValueError):
    """A placement that cannot exist or a payload that does not decode; the message says why."""


@dataclass(frozen=True, slots=True)
class Placement:
    """A placement of ``num_experts`` logical experts over ``num_slots`` slots.

    ``phy2log`` ``[num_slots * experts_per_slot]``; ``home`` the initial ``phy2log``; ``live``
    the sorted live slots (dead slots hold nothing); ``load`` the per-expert load it was
    planned for.
    """

    num_experts: int
    num_slots: int
    experts_per_slot: int
    max_replicas: int
    phy2log: tuple[int, ...]
    home: tuple[int, ...]
    live: tuple[int, ...]
    load: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_slots", "experts_per_slot", "max_replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlacementError(f"placement {name} must be an integer >= 1, got {value!r}.")
        for name in ("phy2log", "home", "live", "load"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._check_shapes()
        for name in ("phy2log", "home"):
            self._check_slots(name, getattr(self, name))
        dead = [p for p in range(self.capacity) if self.slot_of(p) not in self.live]
        if any(self.phy2log[p] >= 0 for p in dead):
            raise PlacementError("placement phy2log holds experts on slots that are not live.")
        too_many = [e for e, c in enumerate(self.replica_count) if c > self.max_replicas]
        if too_many:
            raise PlacementError(f"experts {too_many} have more than {self.max_replicas} replicas.")

    def _check_shapes(self) -> None:
        if len(self.phy2log) != self.capacity or len(self.home) != self.capacity:
            raise PlacementError(
                f"placement phy2log and home must have num_slots * experts_per_slot = "
                f"{self.capacity} entries, got {len(self.phy2log)} and {len(self.home)}."
            )
        if len(self.load) != self.num_experts:
            raise PlacementError(f"placement load must have {self.num_experts} entries.")
        if list(self.live) != sorted(set(self.live)) or not set(self.live) <= set(self.slots):
            raise PlacementError(f"placement live slots {list(self.live)} must be sorted slots.")

    def _check_slots(self, name: str, phy2log: tuple[int, ...]) -> None:
        if any(not -1 <= e < self.num_experts for e in phy2log):
            raise PlacementError(f"placement {name} holds ids outside [-1, {self.num_experts}).")
        for s in self.slots:
            held = [e for e in self._slot(phy2log, s) if e >= 0]
            if len(held) != len(set(held)):
                raise PlacementError(f"placement {name} puts one expert twice on slot {s}.")

    # --- derived views -------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.num_slots * self.experts_per_slot

    @property
    def slots(self) -> range:
        return range(self.num_slots)

    def slot_of(self, phy: int) -> int:
        return phy // self.experts_per_slot

    def _slot(self, phy2log: Sequence[int], slot: int) -> Sequence[int]:
        return phy2log[slot * self.experts_per_slot : (slot + 1) * self.experts_per_slot]

    def slot_experts(self, slot: int) -> tuple[int, ...]:
        """The logical experts of ``slot`` in local order (``-1`` = empty position)."""
        return tuple(self._slot(self.phy2log, slot))

    @property
    def replica_count(self) -> list[int]:
        """``[num_experts]``: live replicas per logical expert."""
        count = Counter(e for e in self.phy2log if e >= 0)
        return [count[e] for e in range(self.num_experts)]

    @property
    def log2phy(self) -> list[list[int]]:
        """``[num_experts][max_replicas]``: physical replicas in increasing order, ``-1`` pad."""
        rows: list[list[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.phy2log):
            if e >= 0:
                rows[e].append(p)
        return [r + [-1] * (self.max_replicas - len(r)) for r in rows]

    @property
    def orphans(self) -> tuple[int, ...]:
        """Logical experts with no live replica (a view holding any is degraded)."""
        return tuple(e for e, c in enumerate(self.replica_count) if c == 0)

    # --- JSON (the ``placement`` payload of a membership view) ----------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_json` reads it (or its ``json.dumps``) back."""
        return {
            "num_experts": self.num_experts,
            "num_slots": self.num_slots,
            "experts_per_slot": self.experts_per_slot,
            "max_replicas": self.max_replicas,
            "phy2log": list(self.phy2log),
            "home": list(self.home),
            "live": list(self.live),
            "load": list(self.load),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any] | str | bytes) -> Placement:
        try:
            raw = json.loads(obj) if isinstance(obj, str | bytes) else dict(obj)
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise PlacementError(f"not a placement payload: {exc}") from exc


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """The placement to serve next; ``orphaned`` lists the experts still without a live
    replica (capacity ran out: the view is degraded)."""

    placement: Placement
    orphaned: tuple[int, ...]


# --- initial placement ------------------------------------------------------------------------


def two_replica_experts_per_slot(num_experts: int, num_slots: int) -> int:
    """The physical experts per slot that hold two replicas of every expert (rounded up): the
    capacity at which one slot failure orphans nothing. The launcher's, benches' and tests'
    default."""
    return -(-2 * num_experts // num_slots)


def initial_placement(
    num_experts: int,
    num_slots: int,
    experts_per_slot: int,
    load: Sequence[float] | None = None,
    max_replicas: int | None = None,
) -> Placement:
    """EPLB-style placement: spare capacity first gives the heaviest experts a second replica
    (so a slot failure orphans nothing when capacity >= 2 * num_experts, and as few as
    possible otherwise), then more replicas to the experts of highest load per replica.
    Replicas of one expert go to distinct slots; heavy groups are spread first."""
    capacity = num_slots * experts_per_slot
    if num_experts < 1 or num_slots < 1 or experts_per_slot < 1:
        raise PlacementError("num_experts, num_slots and experts_per_slot must all be >= 1.")
    if capacity < num_experts:
        raise PlacementError(
            f"{num_experts} experts do not fit {num_slots} slots x {experts_per_slot} experts: "
            "add slots or raise experts_per_slot."
        )
    loads = _loads(load, num_experts)
    cap = min(num_slots, max_replicas or num_slots)
    counts = _replica_counts(loads, capacity, cap)
    phy2log = _assign(counts, loads, num_slots, experts_per_slot)
    return Placement(
        num_experts=num_experts,
        num_slots=num_slots,
        experts_per_slot=experts_per_slot,
        max_replicas=max_replicas or max(counts),
        phy2log=phy2log,
        home=phy2log,
        live=tuple(range(num_slots)),
        load=loads,
    )


def _loads(load: Sequence[float] | None, num_experts: int) -> tuple[float, ...]:
    if load is None:
        return (1.0,) * num_experts
    loads = tuple(float(x) for x in load)
    if len(loads) != num_experts or any(not x >= 0 for x in loads):
        raise PlacementError(f"load must be {num_experts} numbers >= 0, got {list(load)!r}.")
    return loads


def _replica_counts(loads: tuple[float, ...], capacity: int, cap: int) -> list[int]:
    num_experts = len(loads)
    counts = [1] * num_experts
    spare = min(capacity, num_experts * cap) - num_experts
    heaviest = sorted(range(num_experts), key=lambda e: (-loads[e], e))
    for e in heaviest[: spare if cap >= 2 else 0]:
        counts[e] = 2
        spare -= 1
    heap = [(-loads[e] / counts[e], e) for e in range(num_experts) if counts[e] < cap]
    heapq.heapify(heap)
    while spare > 0:
        _, e = heapq.heappop(heap)
        counts[e] += 1
        spare -= 1
        if counts[e] < cap:
            heapq.heappush(heap, (-loads[e] / counts[e], e))
    return counts


def _assign(
    counts: list[int], loads: tuple[float, ...], num_slots: int, per_slot: int
) -> tuple[int, ...]:
    """Each expert's replicas to the slots with the most room left (ties: least load), largest
    groups first: that greedy (Gale-Ryser) always finds room on distinct slots."""
    room = [per_slot] * num_slots
    slot_load = [0.0] * num_slots
    held: list[list[int]] = [[] for _ in range(num_slots)]
    order = sorted(range(len(counts)), key=lambda e: (-counts[e], -loads[e] / counts[e], e))
    for e in order:
        chosen = sorted(range(num_slots), key=lambda s: (-room[s], slot_load[s], s))[: counts[e]]
        assert all(room[s] > 0 for s in chosen), "greedy placement ran out of room"
        for s in chosen:
            room[s] -= 1
            slot_load[s] += loads[e] / counts[e]
            held[s].append(e)
    return tuple(e for h in held for e in sorted(h) + [-1] * (per_slot - len(h)))


# --- repair and rejoin ------------------------------------------------------------------------


def repair(placement: Placement, live_slots: Collection[int]) -> PlacementPlan:
    """The placement after the slots outside ``live_slots`` died.

    Survivors keep every expert they hold except redundant replicas overwritten to re-home an
    orphaned expert (empty positions are used first, then replicas of the experts with the
    most live replicas).
    """
    live = _live(placement, live_slots)
    if not set(live) <= set(placement.live):
        raise PlacementError(
            f"slots {sorted(set(live) - set(placement.live))} are not live in this placement: "
            "bring a slot back with add_slot, not repair."
        )
    phy2log = _rehome(placement, _cleared(placement, placement.phy2log, live), live)
    target = replace(placement, phy2log=tuple(phy2log), live=live)
    return PlacementPlan(target, target.orphans)


def add_slot(placement: Placement, slot: int) -> PlacementPlan:
    """The placement after ``slot`` comes back: it gets its home experts again, and every
    live slot returns to its home experts too, except where an expert whose home slots are
    all still dead must stay re-homed. The target depends only on the home placement and the
    live set, so the same membership always yields the same placement."""
    if slot not in placement.slots:
        raise PlacementError(f"slot {slot} is not in [0, {placement.num_slots}).")
    if slot in placement.live:
        raise PlacementError(f"slot {slot} is already live in this placement.")
    live = tuple(sorted({*placement.live, slot}))
    phy2log = _rehome(placement, _cleared(placement, placement.home, live), live)
    target = replace(placement, phy2log=tuple(phy2log), live=live)
    return PlacementPlan(target, target.orphans)


def _live(placement: Placement, live_slots: Collection[int]) -> tuple[int, ...]:
    live = tuple(sorted(set(live_slots)))
    if any(s not in placement.slots for s in live):
        raise PlacementError(f"live slots {list(live)} must lie in [0, {placement.num_slots}).")
    return live


def _cleared(placement: Placement, phy2log: Sequence[int], live: tuple[int, ...]) -> list[int]:
    """``phy2log`` with every position of a slot outside ``live`` emptied."""
    alive = set(live)
    return [e if placement.slot_of(p) in alive else -1 for p, e in enumerate(phy2log)]


def _rehome(placement: Placement, phy2log: list[int], live: tuple[int, ...]) -> list[int]:
    """Put each orphan (heaviest first) on one live position: an empty one, else a replica of
    the expert with the most replicas; ties spread re-homed experts over slots."""
    count = Counter(e for e in phy2log if e >= 0)
    loads = placement.load
    orphans = sorted(
        (e for e in range(placement.num_experts) if count[e] == 0), key=lambda e: (-loads[e], e)
    )
    positions = [
        p
        for s in live
        for p in range(s * placement.experts_per_slot, (s + 1) * placement.experts_per_slot)
    ]
    rehomed_on: Counter[int] = Counter()

    def victim_key(p: int) -> tuple:
        e = phy2log[p]
        empty = e < 0
        return (
            not empty,
            0 if empty else -count[e],
            rehomed_on[placement.slot_of(p)],
            0.0 if empty else loads[e],
            p,
        )

    for orphan in orphans:
        free = [p for p in positions if phy2log[p] < 0 or count[phy2log[p]] >= 2]
        if not free:
            break  # out of capacity: the rest stay orphaned (a degraded view)
        p = min(free, key=victim_key)
        if phy2log[p] >= 0:
            count[phy2log[p]] -= 1
        phy2log[p] = orphan
        count[orphan] = 1
        rehomed_on[placement.slot_of(p)] += 1
    return phy2log
