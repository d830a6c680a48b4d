"""One place that turns a fabric name into a fabric of one slot (``shm``, ``nccl``, ``symm``,
``te``).

Every fabric implements :class:`~eep.fabrics.base.Fabric`; this is the only place that asks
which one it builds.
"""

from __future__ import annotations

import torch

from .base import Fabric, FabricConfig, FabricMember

FABRICS = ("shm", "nccl", "symm", "te")


def make_fabric(kind: str, cfg: FabricConfig, member: FabricMember) -> Fabric:
    """The ``kind`` fabric of ``member.slot``, sized by ``cfg``.

    - ``shm``: CPU; ``member.elastic=False`` turns the checks off (overhead measurements only).
    - ``nccl``: the fixed-membership baseline (gloo on CPU, NCCL on ``cuda:i``); joins the
      default process group through the TCP store at ``member.store_addr`` (``host:port``,
      hosted by slot 0) unless this process is already in one; ``elastic`` does not apply.
    - ``symm``: CUDA only; nothing collective: peers' buffers are found through
      ``member.peer_info(slot, incarnation)`` (the runtime reads them from etcd) when a view
      names them; ``member.view`` is the ``DeviceView`` the kernels should read (the
      engine's, for captured graphs), else the fabric keeps its own.
    - ``te``: CPU, across hosts: the ``shm`` protocol, with peers on other hosts (another
      ``member.host_id`` in their export) written to through ``member.transport``, the rank's
      Mooncake Transfer Engine; peers on this host through shared memory as in ``shm``.
    """
    device = torch.device(member.device)
    if kind == "shm":
        from .shm import ShmFabric

        if device.type != "cpu":
            raise ValueError(f"the shm fabric runs on the CPU, not {device}; use symm on GPUs.")
        return ShmFabric(
            member.cluster,
            member.slot,
            member.incarnation,
            cfg,
            member.newest_epoch,
            elastic=member.elastic,
            on_wait=member.on_wait,
        )
    if kind == "nccl":
        from .nccl import NcclFabric

        return NcclFabric(member.slot, cfg, store_addr=member.store_addr, device=device)
    if kind == "symm":
        from .symm import SymmFabric

        if device.type != "cuda":
            raise ValueError(f"the symm fabric needs a CUDA device, got {device}; use shm.")
        if member.peer_info is None:
            raise ValueError("the symm fabric needs peer_info to find its peers' buffers.")
        return SymmFabric(
            member.slot,
            cfg,
            member.view,
            member.newest_epoch,
            peer_info=member.peer_info,
            device=device,
            elastic=member.elastic,
        )
    if kind == "te":
        from .te import TeFabric

        if device.type != "cpu":
            raise ValueError(f"the te fabric runs on the CPU, not {device}; use symm on GPUs.")
        if member.transport is None or member.peer_info is None:
            raise ValueError("the te fabric needs the rank's transport and peer_info.")
        return TeFabric(
            member.cluster,
            member.slot,
            member.incarnation,
            cfg,
            member.transport,
            member.host_id,
            member.peer_info,
            member.newest_epoch,
            elastic=member.elastic,
            on_wait=member.on_wait,
        )
    raise ValueError(f"unknown fabric {kind!r}; choose one of {FABRICS}.")
