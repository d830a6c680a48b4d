"""The committed membership view and its JSON codec.

A view is what every rank serves against: ``epoch`` (one more per commit), the live
``members`` (slots) with the incarnation each one had when admitted, and the ``placement``
payload the planner produced (opaque here: any JSON value; the runtime gives it meaning).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import MalformedView

_FIELDS = {"epoch", "members", "incarnations", "placement", "reason", "committed_at"}


@dataclass(frozen=True, slots=True)
class View:
    """One committed view.

    ``members`` is sorted and duplicate-free; ``incarnations[slot]`` is the incarnation of the
    process admitted for ``slot`` (a restarted process is a different member of the same slot).
    """

    epoch: int
    members: tuple[int, ...]
    incarnations: tuple[tuple[int, int], ...] = ()
    placement: Any = None
    reason: str = ""
    committed_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 1:
            raise MalformedView(f"view epoch must be an integer >= 1, got {self.epoch!r}.")
        members = tuple(self.members)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in members):
            raise MalformedView(f"view members must be slot numbers >= 0, got {members!r}.")
        if len(set(members)) != len(members) or list(members) != sorted(members):
            raise MalformedView(f"view members must be sorted and unique, got {members!r}.")
        incs = tuple(sorted((int(s), int(i)) for s, i in self.incarnations))
        if {s for s, _ in incs} - set(members):
            raise MalformedView(
                f"view incarnations name slots {sorted({s for s, _ in incs} - set(members))} "
                f"that are not members {list(members)}."
            )
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "incarnations", incs)

    def incarnation(self, slot: int) -> int | None:
        return dict(self.incarnations).get(slot)

    def next(self, members: dict[int, int], placement: Any, reason: str) -> View:
        """The view that follows this one, with ``members`` as ``{slot: incarnation}``."""
        return View(
            epoch=self.epoch + 1,
            members=tuple(sorted(members)),
            incarnations=tuple(members.items()),
            placement=placement,
            reason=reason,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "epoch": self.epoch,
                "members": list(self.members),
                "incarnations": {str(s): i for s, i in self.incarnations},
                "placement": self.placement,
                "reason": self.reason,
                "committed_at": self.committed_at,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str | bytes, where: str = "view") -> View:
        """Decode and validate; anything wrong is a :class:`MalformedView` naming ``where``."""
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedView(
                f"{where} is not JSON ({exc}); rewrite it with a coordinator."
            ) from exc
        if not isinstance(obj, dict):
            raise MalformedView(f"{where} must be a JSON object, got {type(obj).__name__}.")
        missing = {"epoch", "members"} - obj.keys()
        if missing:
            raise MalformedView(f"{where} lacks the fields {sorted(missing)}.")
        unknown = obj.keys() - _FIELDS
        if unknown:
            raise MalformedView(f"{where} has unknown fields {sorted(unknown)}.")
        incs = obj.get("incarnations") or {}
        if not isinstance(incs, dict) or not isinstance(obj["members"], list):
            raise MalformedView(f"{where}: members must be a list and incarnations an object.")
        try:
            return cls(
                epoch=obj["epoch"],
                members=tuple(obj["members"]),
                incarnations=tuple((int(s), int(i)) for s, i in incs.items()),
                placement=obj.get("placement"),
                reason=str(obj.get("reason", "")),
                committed_at=float(obj.get("committed_at", 0.0)),
            )
        except MalformedView as exc:
            raise MalformedView(f"{where}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise MalformedView(f"{where} has a field of the wrong type: {exc}") from exc
