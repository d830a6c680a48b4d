"""Bad input ends in a clear, typed error within a bounded time."""

from __future__ import annotations

import time

import pytest

from eep.tools.holder_proc import spec_tensors
from eep.transfer.arena import Arena, ArenaLayout
from eep.transfer.engine import PeerRef, Region
from eep.transfer.errors import (
    LayoutMismatch,
    MissingManifest,
    NoSource,
    PeerUnreachable,
    TransferFailed,
    UnknownSlot,
)
from eep.transfer.executor import Puller
from eep.transfer.manifest import Manifest, ManifestEntry, ManifestStore

from .conftest import tcp_config

MiB = 1 << 20


def test_unknown_slot_is_refused(etcd, cluster):
    store = ManifestStore(etcd, cluster, num_slots=4)
    for bad in (4, "-1", "x", "backup-a"):
        with pytest.raises(UnknownSlot, match="not a slot"):
            store.get(bad)


def test_missing_manifest_names_the_holder(etcd, cluster):
    with pytest.raises(MissingManifest, match="no manifest of 2"):
        ManifestStore(etcd, cluster, num_slots=4).get(2)


def test_malformed_manifest_is_skipped_by_live_and_refused_by_get(etcd, cluster):
    store = ManifestStore(etcd, cluster)
    etcd.put(store.key(1), b"{not json")
    assert store.live() == []
    with pytest.raises(Exception, match="malformed"):
        store.get(1)


def test_manifest_that_does_not_match_the_local_layout_is_refused(
    holders, transport, etcd, cluster
):
    theirs = spec_tensors(2, 1 * MiB)
    ours = [(n, "float32", shape) for n, _, shape in theirs]  # same names, other dtype
    a = holders.start("0", theirs)
    holders.wait_ready(a)
    arena = Arena("experts", ArenaLayout.pack(ours))
    with pytest.raises(LayoutMismatch, match="different models"):
        Puller(transport, arena, tcp_config()).pull(ManifestStore(etcd, cluster).live())


def _fake_manifest(session: str, tensors) -> Manifest:
    layout = ArenaLayout.pack(tensors)
    region = Region("experts", 1 << 40, layout.nbytes)
    entries = {
        s.name: ManifestEntry("experts", s.offset, s.nbytes, s.dtype, s.shape, "w64-0")
        for s in layout.specs
    }
    return Manifest("3", session, "tcp", "testhost", (region,), entries, slot=3)


def test_unreachable_peer_ends_in_no_source_within_the_deadline(transport, etcd, cluster):
    from eep.membership.server import free_port

    tensors = spec_tensors(2, 1 * MiB)
    store = ManifestStore(etcd, cluster)
    store.publish(_fake_manifest(f"127.0.0.1:{free_port()}", tensors))  # nothing listens
    arena = Arena("experts", ArenaLayout.pack(tensors))
    arena.register(transport)
    cfg = tcp_config(pull_timeout_s=20.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(NoSource, match="did not answer a probe|answered the probe"):
            Puller(transport, arena, cfg).pull(store.live())
    finally:
        arena.unregister()
    assert time.monotonic() - t0 < cfg.pull_timeout_s


def test_engine_read_from_a_dead_peer_names_operation_and_peer(transport):
    from eep.membership.server import free_port

    peer = PeerRef("7", f"127.0.0.1:{free_port()}", "tcp", "testhost")
    arena = Arena("x", ArenaLayout.pack([("t", "uint8", (4096,))]))
    arena.register(transport)
    try:
        with pytest.raises(PeerUnreachable, match=r"peer 7 at 127\.0\.0\.1"):
            transport.read_batch(peer, [arena.addr], [1 << 40], [4096])
    finally:
        arena.unregister()


def test_engine_read_outside_the_peers_regions_is_a_transfer_error(
    holders, transport, etcd, cluster
):
    a = holders.start("0", spec_tensors(1, 1 * MiB))
    holders.wait_ready(a)
    peer = ManifestStore(etcd, cluster).get(0).peer
    arena = Arena("x", ArenaLayout.pack([("t", "uint8", (4096,))]))
    arena.register(transport)
    try:
        with pytest.raises(TransferFailed, match="batch read") as info:
            transport.read_batch(peer, [arena.addr], [peer.regions[0].addr - (1 << 30)], [4096])
    finally:
        arena.unregister()
    assert info.value.op == "batch read" and info.value.peer == peer.session
