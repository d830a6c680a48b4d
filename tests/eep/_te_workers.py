"""Worker processes for the te fabric tests (spawned: importable by name): the shm tests'
inputs and reference, two "hosts" (``host_id``) of two slots each on one machine, so peers on
the other host are reached through the Mooncake Transfer Engine over loopback."""

from __future__ import annotations

import os

from eep.fabrics.base import peer_info_from_dir, publish_to_dir
from eep.fabrics.te import TeFabric

from ._shm_workers import CFG, rounds_of


def host_of(slot: int) -> str:
    return f"h{slot // 2}"


def worker(cluster, root, slot, members, rounds, barrier, results, die_at=None, second=None):
    os.environ["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    from eep.transfer.config import TransferConfig
    from eep.transfer.engine import start_transport

    transport = start_transport(TransferConfig(protocol="tcp", host_id=host_of(slot)))
    peers = peer_info_from_dir(root, cluster)
    fabric = TeFabric(cluster, slot, 1, CFG, transport, host_of(slot), peers)
    publish_to_dir(root, cluster, slot, 1, fabric.export())
    barrier.wait(timeout=60)
    fabric.apply_view(1, {s: 1 for s in members})
    out = rounds_of(fabric, rounds, die_at, second)
    out.append(("stats", -1, dict(fabric.stats), sorted(fabric.remotes)))
    results.put((slot, out))
    barrier.wait(timeout=60)  # nobody unregisters while a peer may still write
    fabric.close()
