"""The committed membership view and its JSON codec.

A view is what every rank serves against: ``epoch`` (one more per commit), the live
``members`` (slots) with the incarnation each one had when admitted, and the ``placement``
payload the planner produced (opaque here: any JSON value; the runtime gives it meaning).
"""

from __future__ import annotations

import json
import operator
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import INT64_MAX, MalformedView, check_int, check_type, clip, decode_object


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
        epoch = self.epoch
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= INT64_MAX:
            raise MalformedView(f"view epoch must be an integer in [1, 2**63 - 1], got {epoch!r}.")
        members = tuple(self.members)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in members):
            raise MalformedView(f"view members must be slot numbers >= 0, got {clip(members)}.")
        if len(set(members)) != len(members) or list(members) != sorted(members):
            raise MalformedView(f"view members must be sorted and unique, got {clip(members)}.")
        try:
            incs = tuple(
                sorted((operator.index(s), operator.index(i)) for s, i in self.incarnations)
            )
        except (TypeError, ValueError) as exc:
            raise MalformedView(f"view incarnations must be (slot, number) pairs: {exc}") from None
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
        """Decode and validate; anything wrong is a :class:`MalformedView` naming ``where``.

        ``epoch`` and ``members`` are required; ``incarnations`` (``{"<slot>": n}``, slots
        among the members), ``placement`` (any JSON), ``reason`` and ``committed_at`` are
        optional. Fields this version does not know are ignored: a newer coordinator may add
        some, and its views must still reach older ranks.
        """
        obj = decode_object(raw, where, MalformedView)
        missing = {"epoch", "members"} - obj.keys()
        if missing:
            raise MalformedView(f"{where} lacks the fields {sorted(missing)}.")
        epoch = check_int(obj, "epoch", where, MalformedView, lo=1)
        members = check_type(obj, "members", list, where, MalformedView)
        for m in members:
            if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= INT64_MAX:
                raise MalformedView(f"{where}: members must be slot numbers >= 0, got {clip(m)}.")
        obj.setdefault("incarnations", {})
        incs = check_type(obj, "incarnations", dict, where, MalformedView)
        pairs = []
        for s, inc in incs.items():
            if not (s.isascii() and s.isdigit() and len(s) <= 19 and str(int(s)) == s):
                raise MalformedView(f"{where}: incarnations names {s[:40]!r}, not a slot number.")
            pairs.append(
                (int(s), check_int({s: inc}, s, f"{where}: incarnations", MalformedView, 1))
            )
        obj.setdefault("reason", "")
        obj.setdefault("committed_at", 0.0)
        committed_at = check_type(obj, "committed_at", (int, float), where, MalformedView)
        if isinstance(committed_at, int) and abs(committed_at) > 2**53:
            raise MalformedView(f"{where}: committed_at {clip(committed_at)} is not a time.")
        try:
            return cls(
                epoch=epoch,
                members=tuple(members),
                incarnations=tuple(pairs),
                placement=obj.get("placement"),
                reason=check_type(obj, "reason", str, where, MalformedView),
                committed_at=float(committed_at),
            )
        except MalformedView as exc:
            raise MalformedView(f"{where}: {exc}") from None
