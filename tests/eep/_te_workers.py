"""Worker processes for the te fabric tests (spawned: importable by name): the shm tests'
inputs and reference, two "hosts" (``host_id``) of two slots each on one machine, so peers on
the other host are reached through the Mooncake Transfer Engine over loopback."""

from __future__ import annotations

import json
import os
import signal
import time

from eep.fabrics.base import ExchangeFailed
from eep.fabrics.te import TeFabric

from ._shm_workers import CFG, exchange


def host_of(slot: int) -> str:
    return f"h{slot // 2}"


def _publish(root: str, slot: int, export: dict) -> None:
    path = os.path.join(root, f"{slot}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"incarnation": 1, **export}, f)
    os.replace(path + ".tmp", path)


def _peer_info(root: str):
    def find(slot: int, incarnation: int) -> dict | None:
        try:
            with open(os.path.join(root, f"{slot}.json")) as f:
                info = json.load(f)
        except FileNotFoundError:
            return None
        return info if info["incarnation"] == incarnation else None

    return find


def worker(cluster, root, slot, members, rounds, barrier, results, die_at=None, second=None):
    os.environ["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    import logging

    logging.basicConfig(level=logging.INFO)
    from eep.transfer.config import TransferConfig
    from eep.transfer.engine import start_transport

    transport = start_transport(TransferConfig(protocol="tcp", host_id=host_of(slot)))
    fabric = TeFabric(cluster, slot, 1, CFG, transport, host_of(slot), _peer_info(root))
    _publish(root, slot, fabric.export())
    barrier.wait(timeout=60)
    fabric.apply_view(1, {s: 1 for s in members})
    out = []
    for r in range(rounds):
        if die_at == r:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            out.append(("ok", r, exchange(fabric, r).numpy()))
        except ExchangeFailed as exc:
            started = time.monotonic()
            out.append(("failed", r, (exc.reason.value, exc.suspects)))
            if second is None:
                break
            fabric.apply_view(2, {s: 1 for s in second})
            out.append(("recovered_after_s", r, time.monotonic() - started))
            second = None
    out.append(("stats", -1, dict(fabric.stats), sorted(fabric.remotes)))
    results.put((slot, out))
    barrier.wait(timeout=60)  # nobody unregisters while a peer may still write
    fabric.close()
