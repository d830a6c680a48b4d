"""One place that turns a fabric name into a fabric of one slot (``shm``, ``nccl``, ``symm``).

All three share the engine's interface: ``apply_view(epoch, members)``,
``dispatch(x, topk_phy, topk_weights) -> (recv, handle)`` with ``recv.x`` ``[N, H]`` and
``recv.local_expert`` ``[N]``, ``combine(y, handle) -> [T, H]``, ``close()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import FabricConfig

FABRICS = ("shm", "nccl", "symm")


def make_fabric(
    kind: str,
    cluster: str,
    slot: int,
    incarnation: int,
    cfg: FabricConfig,
    newest_epoch: Callable[[], int] = lambda: 0,
    *,
    store_addr: str | None = None,
    device: torch.device | str = "cpu",
    elastic: bool = True,
    view=None,
    on_wait: Callable[[], None] = lambda: None,
    peer_info: Callable[[int, int], dict | None] | None = None,
):
    """The ``kind`` fabric of ``slot``.

    - ``shm``: CPU; ``elastic=False`` turns the checks off (overhead measurements only).
    - ``nccl``: the fixed-membership baseline (gloo on CPU, NCCL on ``cuda:i``); joins the
      default process group through the TCP store at ``store_addr`` (``host:port``, hosted by
      slot 0) unless this process is already in one; ``elastic`` does not apply.
    - ``symm``: CUDA only; nothing collective: peers' buffers are found through
      ``peer_info(slot, incarnation)`` (the runtime reads them from etcd) when a view names
      them; ``view`` is the ``DeviceView`` the kernels should read (the engine's, for captured
      graphs), else the fabric keeps its own.
    """
    device = torch.device(device)
    if kind == "shm":
        from .shm import ShmFabric

        if device.type != "cpu":
            raise ValueError(f"the shm fabric runs on the CPU, not {device}; use symm on GPUs.")
        return ShmFabric(
            cluster, slot, incarnation, cfg, newest_epoch, elastic=elastic, on_wait=on_wait
        )
    if kind == "nccl":
        from .nccl import NcclFabric

        return NcclFabric(slot, cfg, store_addr=store_addr, device=device)
    if kind == "symm":
        from .symm import SymmFabric

        if device.type != "cuda":
            raise ValueError(f"the symm fabric needs a CUDA device, got {device}; use shm.")
        if peer_info is None:
            raise ValueError("the symm fabric needs peer_info to find its peers' buffers.")
        return SymmFabric(
            slot, cfg, view, newest_epoch, peer_info=peer_info, device=device, elastic=elastic
        )
    raise ValueError(f"unknown fabric {kind!r}; choose one of {FABRICS}.")
