"""Manifests: where each tensor lies in a holder's arenas, with its checksum, in etcd.

Key: ``/eep/<cluster>/manifests/<holder>``, where ``holder`` is the rank's slot number. A rank
writes its manifest under its slot's lease, so a dead rank's manifest disappears with the
lease; the executor still re-plans around a holder that dies before that.

Value (JSON)::

    {"holder": "3", "slot": 3, "incarnation": 2, "host_id": "gpu-a", "pid": 4242,
     "endpoint": {"session": "10.0.0.5:15431", "protocol": "nvlink_intra"},
     "regions": [{"name": "experts", "addr": 1399..., "nbytes": 4294967296,
                  "medium": "device", "device": "cuda:3", "ipc": "", "block_nbytes": 0}],
     "tensors": {"layers.0.experts.7.w1": {"region": "experts", "offset": 0,
                 "nbytes": 29360128, "dtype": "bfloat16", "shape": [7168, 2048],
                 "checksum": "w64-8f1c..."}}}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from eep.membership.errors import MembershipError
from eep.membership.keys import Keys

from .arena import Arena, TensorSpec
from .engine import PeerRef, Region
from .errors import ManifestError, MissingManifest, UnknownSlot

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One tensor of a holder: which region, where in it, its layout and checksum."""

    region: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    checksum: str

    def spec(self, name: str) -> TensorSpec:
        return TensorSpec(name, self.dtype, tuple(self.shape), self.offset, self.nbytes)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A holder's published arenas and tensors (see the module docstring)."""

    holder: str
    session: str
    protocol: str
    host_id: str
    regions: tuple[Region, ...]
    tensors: dict[str, ManifestEntry] = field(default_factory=dict)
    slot: int | None = None
    incarnation: int = 0
    pid: int = 0

    @property
    def peer(self) -> PeerRef:
        return PeerRef(
            self.holder, self.session, self.protocol, self.host_id, self.regions, self.pid
        )

    def region(self, name: str) -> Region:
        return self.peer.region(name)

    def remote_addr(self, name: str) -> int:
        """The holder's address of tensor ``name``."""
        entry = self.tensors[name]
        return self.region(entry.region).addr + entry.offset

    def to_json(self) -> str:
        return json.dumps(
            {
                "holder": self.holder,
                "slot": self.slot,
                "incarnation": self.incarnation,
                "host_id": self.host_id,
                "pid": self.pid,
                "endpoint": {"session": self.session, "protocol": self.protocol},
                "regions": [asdict(r) for r in self.regions],
                "tensors": {
                    n: {**asdict(e), "shape": list(e.shape)} for n, e in self.tensors.items()
                },
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: bytes | str, where: str = "") -> Manifest:
        try:
            d = json.loads(raw)
            regions = tuple(Region(**r) for r in d["regions"])
            names = {r.name for r in regions}
            tensors = {}
            for n, e in d["tensors"].items():
                entry = ManifestEntry(
                    e["region"],
                    int(e["offset"]),
                    int(e["nbytes"]),
                    e["dtype"],
                    tuple(int(x) for x in e["shape"]),
                    e["checksum"],
                )
                if entry.region not in names:
                    raise ValueError(f"tensor {n!r} names unknown region {entry.region!r}")
                tensors[n] = entry
            return cls(
                holder=str(d["holder"]),
                session=d["endpoint"]["session"],
                protocol=d["endpoint"]["protocol"],
                host_id=d["host_id"],
                regions=regions,
                tensors=tensors,
                slot=d.get("slot"),
                incarnation=int(d.get("incarnation", 0)),
                pid=int(d.get("pid", 0)),
            )
        # anything a foreign or hand-written value can raise here (a list where a map belongs,
        # nesting too deep to parse) is a malformed manifest, skipped by its readers
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ManifestError(
                f"manifest {where or '(given)'} is malformed: {exc!r}. Its holder must "
                "re-publish it (a rank does so on start); delete it if the holder is gone."
            ) from exc


def build_manifest(
    holder: str,
    transport,
    arenas: Iterable[Arena],
    checksums: dict[str, str],
    host_id: str,
    slot: int | None = None,
    incarnation: int = 0,
    pid: int = 0,
) -> Manifest:
    """The manifest of registered ``arenas``; ``checksums`` maps each layout tensor to its
    checksum (see :func:`eep.transfer.checksum.checksums`)."""
    arenas = list(arenas)
    tensors = {}
    for arena in arenas:
        for s in arena.layout.specs:
            tensors[s.name] = ManifestEntry(
                arena.name, s.offset, s.nbytes, s.dtype, s.shape, checksums[s.name]
            )
    return Manifest(
        holder=holder,
        session=transport.session,
        protocol=transport.config.protocol,
        host_id=host_id,
        regions=tuple(a.region for a in arenas),
        tensors=tensors,
        slot=slot,
        incarnation=incarnation,
        pid=pid,
    )


class ManifestStore:
    """Manifests of one cluster in etcd. ``num_slots`` bounds valid slot numbers."""

    def __init__(self, etcd, cluster: str, num_slots: int | None = None) -> None:
        self.etcd, self.keys, self.num_slots = etcd, Keys(cluster), num_slots

    def key(self, holder: str | int) -> str:
        return f"{self.keys.manifests}{holder}"

    def _check_holder(self, holder: str | int) -> str:
        holder = str(holder)
        if not holder.isdigit() or (self.num_slots is not None and int(holder) >= self.num_slots):
            bound = f"[0, {self.num_slots})" if self.num_slots is not None else "0, 1, ..."
            raise UnknownSlot(
                f"slot {holder!r} is not a slot of cluster {self.keys.cluster!r} (slots are "
                f"{bound}). Check the slot number."
            )
        return holder

    def publish(self, manifest: Manifest, lease: int = 0) -> int:
        """Write ``manifest`` (under ``lease`` for a rank, so it dies with the rank)."""
        holder = self._check_holder(manifest.holder)
        try:
            return self.etcd.put(self.key(holder), manifest.to_json(), lease=lease)
        except MembershipError as exc:
            raise ManifestError(f"could not publish manifest of {holder}: {exc}") from exc

    def get(self, holder: str | int) -> Manifest:
        """The manifest of one holder; :class:`UnknownSlot` or :class:`MissingManifest`."""
        holder = self._check_holder(holder)
        try:
            kv = self.etcd.get(self.key(holder))
        except MembershipError as exc:
            raise ManifestError(f"could not read manifest of {holder}: {exc}") from exc
        if kv is None:
            raise MissingManifest(
                f"no manifest of {holder} in cluster {self.keys.cluster!r} "
                f"({self.key(holder)}): the holder has not published yet or has died. Wait "
                "for it to register, or pull from another holder."
            )
        return Manifest.from_json(kv.value, self.key(holder))

    def live(self) -> list[Manifest]:
        """Every manifest now in etcd; malformed ones are logged and skipped."""
        try:
            kvs, _ = self.etcd.get_prefix(self.keys.manifests)
        except MembershipError as exc:
            raise ManifestError(f"could not list manifests: {exc}") from exc
        out = []
        for kv in kvs:
            try:
                out.append(Manifest.from_json(kv.value, kv.key))
            except ManifestError as exc:
                log.warning("skipping manifest %s: %s", kv.key, exc)
        return sorted(out, key=lambda m: (m.slot is None, m.slot or 0, m.holder))

    def delete(self, holder: str | int) -> None:
        self.etcd.delete(self.key(self._check_holder(holder)))
