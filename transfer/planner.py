"""The transfer planner: pure, deterministic, no I/O.

Given the tensors a slot wants (its local layout) and the live manifests, assign every
tensor to one source: a live rank that holds it (GPU to GPU), else the checkpoint on disk.
The bytes are spread over the holders to use their aggregate bandwidth: in arena order, each
tensor stays with the holder of its predecessor while that holder is under its fair share of
the bytes (so runs of neighbours travel as one request), else goes to the holder that would
finish it earliest, where a holder on another host counts ``remote_weight`` times as fast as
one on the same host (so same-host holders are preferred, but not to the point of leaving a
remote one idle).

A tensor stays whole on one holder, so a checksum mismatch names one holder. The executor
calls this again, with exclusions, whenever a holder dies, hangs, or sends bad bytes, and cuts
each holder's reads into its requests with :func:`requests_of`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum

from .arena import ALIGN, TensorSpec
from .errors import LayoutMismatch, NoSource
from .manifest import Manifest


class Tier(Enum):
    """Where the holder of a read is, seen from the pulling slot."""

    SAME_HOST = 0
    OTHER_HOST = 1


@dataclass(frozen=True, slots=True)
class ReadOp:
    """Read one tensor: ``nbytes`` at ``remote_addr`` of ``holder`` into ``local_offset``."""

    name: str
    holder: str
    local_offset: int
    remote_addr: int
    nbytes: int
    checksum: str
    tier: Tier


@dataclass(frozen=True, slots=True)
class DiskOp:
    """Load one tensor from the checkpoint into ``local_offset``."""

    name: str
    local_offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class TransferPlan:
    reads: tuple[ReadOp, ...]
    disk: tuple[DiskOp, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.reads) + sum(d.nbytes for d in self.disk)

    def bytes_by_holder(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.reads:
            out[r.holder] = out.get(r.holder, 0) + r.nbytes
        if self.disk:
            out["<disk>"] = sum(d.nbytes for d in self.disk)
        return out

    def by_holder(self) -> dict[str, list[ReadOp]]:
        out: dict[str, list[ReadOp]] = {}
        for r in self.reads:
            out.setdefault(r.holder, []).append(r)
        return out


@dataclass(slots=True)
class Request:
    """One request of the executor: ``nbytes`` contiguous on both sides, covering ``parts``
    (read, bytes): a piece of one large tensor, or several small tensors back to back."""

    local_offset: int
    remote_addr: int
    nbytes: int
    parts: list[tuple[ReadOp, int]]


def requests_of(reads: list[ReadOp], step: int) -> list[Request]:
    """Requests of at most ``step`` bytes; neighbours on both sides (gaps under ``ALIGN``
    equal on both sides, which are padding) are coalesced, so an arena moves in a few large
    requests instead of one per tensor."""
    out: list[Request] = []
    for r in sorted(reads, key=lambda r: r.local_offset):
        if out and r.nbytes <= step:
            c = out[-1]
            gap = r.local_offset - (c.local_offset + c.nbytes)
            if (
                0 <= gap < ALIGN
                and r.remote_addr - (c.remote_addr + c.nbytes) == gap
                and c.nbytes + gap + r.nbytes <= step
            ):
                c.nbytes += gap + r.nbytes
                c.parts.append((r, r.nbytes))
                continue
        for s in range(0, r.nbytes, step):
            n = min(step, r.nbytes - s)
            out.append(Request(r.local_offset + s, r.remote_addr + s, n, [(r, n)]))
    return out


def _check_layouts(targets: Sequence[TensorSpec], manifests: Sequence[Manifest]) -> None:
    for m in manifests:
        entries = m.tensors
        for t in targets:
            e = entries.get(t.name)
            # fields compared in place: a pull checks every tensor of every holder
            if e is not None and (
                e.nbytes != t.nbytes or e.dtype != t.dtype or tuple(e.shape) != tuple(t.shape)
            ):
                raise LayoutMismatch(
                    f"holder {m.holder} has tensor {t.name!r} as {e.dtype}{list(e.shape)} "
                    f"({e.nbytes} bytes) but the local layout wants {t.dtype}{list(t.shape)} "
                    f"({t.nbytes} bytes): the processes were built from different models or "
                    "configs. Restart the holder with the same model, or fix the local config."
                )


def _fair_shares(targets, usable: list[Manifest], weight: dict[str, float]) -> dict[str, float]:
    """Bytes each holder would carry if every holder of a tensor shared it by bandwidth."""
    share = {m.holder: 0.0 for m in usable}
    for t in targets:
        pool = [m for m in usable if t.name in m.tensors]
        if len(pool) == 1:
            share[pool[0].holder] += t.nbytes
            continue
        total_w = sum(weight[m.holder] for m in pool)
        for m in pool:
            share[m.holder] += t.nbytes * weight[m.holder] / total_w
    return share


def _fastest(holders: list[Manifest], nbytes: int, load, weight) -> Manifest:
    """The holder that would finish ``nbytes`` more the earliest (ties: by name)."""
    if len(holders) == 1:  # the common case, a replica: nothing to choose
        return holders[0]
    return min(holders, key=lambda m: ((load[m.holder] + nbytes) / weight[m.holder], m.holder))


def plan_pull(
    targets: Sequence[TensorSpec],
    manifests: Sequence[Manifest],
    *,
    local_host: str,
    checkpoint: Collection[str] = (),
    exclude_holders: Collection[str] = (),
    exclude_pairs: Collection[tuple[str, str]] = (),
    remote_weight: float = 0.25,
) -> TransferPlan:
    """Assign each of ``targets`` to a source (see the module docstring).

    ``checkpoint``: names the checkpoint on disk holds. ``exclude_holders``: holders not to
    use at all (dead, hung, or this slot's own stale manifest). ``exclude_pairs``:
    ``(holder, tensor)`` pairs whose bytes failed their checksum. Raises
    :class:`LayoutMismatch` when a usable holder describes a target differently, and
    :class:`NoSource` when a target has no source, neither a holder nor the checkpoint.
    """
    usable = [m for m in manifests if m.holder not in set(exclude_holders)]
    usable.sort(key=lambda m: m.holder)
    _check_layouts(targets, usable)
    bad = set(exclude_pairs)
    load: dict[str, float] = {m.holder: 0.0 for m in usable}
    weight = {m.holder: 1.0 if m.host_id == local_host else remote_weight for m in usable}
    share = _fair_shares(targets, usable, weight)
    reads, disk, missing = [], [], []
    on_disk = set(checkpoint)
    # each holder's region addresses, looked up once (not once per tensor)
    base = {m.holder: {r.name: r.addr for r in reversed(m.regions)} for m in usable}
    prev = None
    for t in sorted(targets, key=lambda s: (s.offset, s.name)):
        holders = [m for m in usable if t.name in m.tensors and (m.holder, t.name) not in bad]
        if holders:
            best = _fastest(holders, t.nbytes, load, weight)
            # stay with the previous holder while it is under its share: neighbours in the
            # arena then travel as one request (the executor coalesces them)
            stay = prev is not None and any(m is prev for m in holders)
            if stay and load[prev.holder] + t.nbytes <= share[prev.holder]:
                best = prev
            prev = best
            load[best.holder] += t.nbytes
            tier = Tier.SAME_HOST if best.host_id == local_host else Tier.OTHER_HOST
            entry = best.tensors[t.name]
            addr = base[best.holder][entry.region] + entry.offset
            reads.append(
                ReadOp(t.name, best.holder, t.offset, addr, t.nbytes, entry.checksum, tier)
            )
        elif t.name in on_disk:
            disk.append(DiskOp(t.name, t.offset, t.nbytes))
        else:
            missing.append(t.name)
    if missing:
        tried = (
            f"{len(usable)} live holder(s) {[m.holder for m in usable]}, "
            f"excluded {sorted(set(exclude_holders))}, "
            f"{len(bad)} corrupt copies, checkpoint with {len(on_disk)} tensors"
        )
        raise NoSource(sorted(missing), tried)
    return TransferPlan(tuple(reads), tuple(disk))
