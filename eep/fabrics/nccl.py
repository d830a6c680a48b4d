"""The ``nccl`` fabric: the fixed-membership baseline over ``torch.distributed.all_to_all_single``.

One exchange is what a plain EP layer does with collectives:
1. dispatch: the per-destination row counts go through one ``all_to_all_single`` (so every
   rank knows its receive split sizes), then the rows themselves, each packed with its local
   expert id, through a second one;
2. combine: the expert outputs go back through a third one with the split sizes reversed, and
   the sender takes the weighted sum of its top-k outputs (``weighted_sum``, in ``k`` order).

Rows reach a destination grouped by sender and, within a sender, in flat ``t * K + k`` order,
as the ``shm`` and ``symm`` fabrics deliver them, so every expert sees the same rows in the
same order and the results are bit-identical across fabrics.

No elasticity: the process group is formed once by every slot (rank = slot, world =
``num_slots``, rendezvous at a TCP store that slot 0 hosts) and :meth:`NcclFabric.apply_view`
accepts only the full membership it started with. A missing peer is not survivable: on CPU
(gloo) each collective is bounded by ``cfg.exchange_timeout_s`` and then raises
:class:`CollectiveFailed`; on GPU (NCCL) the host only orders its stream after the collective,
as an ordinary NCCL EP layer does, and a collective that never completes hangs until NCCL's
watchdog aborts the process at the group's timeout (``init_timeout_s``, at least
``NCCL_MIN_TIMEOUT_S``: the first collective sets up NCCL's connections, which takes longer
than an elastic exchange timeout). Either way the cluster must be restarted; the baseline
learns of a dead peer from torchrun (the process exits), not from this wait. A host-side
bounded wait on NCCL (``work.wait(timeout)``) is not used: it polls the collective's event with
a sleep between polls, a fixed cost per exchange that made this baseline slower than the
collectives it measures, and one that expires aborts the communicator ("unhandled system
error" on every rank, seen on the lent H200s).

gloo implements ``all_to_all_single`` (checked on torch 2.13, CPU wheel, uint8 payloads and
zero-row splits included), so the CPU and GPU paths are the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from eep.kernels.experts import weighted_sum
from eep.torchrun import BoundTCPStore

from .base import Fabric, FabricConfig

log = logging.getLogger(__name__)


class MembershipFixed(ValueError):
    """A view other than the full, original membership reached the fixed-membership fabric."""


class CollectiveFailed(RuntimeError):
    """A collective errored or timed out: a peer died or wedged; the process group is unusable."""


def parse_store_addr(store_addr: str) -> tuple[str, int]:
    host, sep, port = store_addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"store address {store_addr!r} must be 'host:port'.")
    return host, int(port)


def ensure_process_group(
    store_addr: str | None,
    slot: int,
    num_slots: int,
    backend: str,
    timeout_s: float,
    device: torch.device | None = None,
) -> bool:
    """Joins the default process group (rank = slot, world = ``num_slots``) unless this process
    is already in one of that shape; returns whether it was created here (and is ours to
    destroy). Slot 0 hosts the TCP store at ``store_addr``; every rank must call this within
    ``timeout_s`` of the others, or the rendezvous raises :class:`CollectiveFailed`."""
    if dist.is_initialized():
        if dist.get_rank() != slot or dist.get_world_size() != num_slots:
            raise ValueError(
                f"slot {slot}: this process is already rank {dist.get_rank()} of a process "
                f"group of {dist.get_world_size()}, not rank {slot} of {num_slots}."
            )
        return False
    if store_addr is None:
        raise ValueError(
            f"slot {slot}: no process group yet and no store address; pass store_addr="
            "'host:port' (slot 0 hosts the store there)."
        )
    host, port = parse_store_addr(store_addr)
    timeout = timedelta(seconds=timeout_s)
    try:
        store = BoundTCPStore(host, port, num_slots, slot == 0, timeout=timeout)  # on host only
        dist.init_process_group(
            backend,
            store=store,
            rank=slot,
            world_size=num_slots,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
    except RuntimeError as exc:  # dist.DistError is one
        raise CollectiveFailed(
            f"slot {slot}: {backend} rendezvous at {store_addr} failed within {timeout_s} s; "
            "every slot must start (and slot 0 must host the store) together."
        ) from exc
    log.info("slot %d: joined %s process group of %d via %s", slot, backend, num_slots, store_addr)
    return True


@dataclass(frozen=True)
class NcclRecv:
    """What a destination received: ``x`` ``[N, H]`` grouped by sender, ``local_expert``
    ``[N]`` int64, ``counts[s]`` the rows from sender ``s``."""

    x: torch.Tensor
    local_expert: torch.Tensor
    counts: list[int]


@dataclass(frozen=True)
class NcclHandle:
    """What combine needs: ``order`` ``[n]`` int64 the flat ``t * K + k`` entry of each row this
    rank sent (in send order), the split sizes both ways, the router weights ``[T, K]``."""

    order: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    topk_weights: torch.Tensor
    num_tokens: int


def plan_sends(
    topk_phy: torch.Tensor, experts_per_slot: int, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_phy`` ``[T, K]`` -> ``(order [n] int64, counts [S] int64)``: the flat entries to
    send, grouped by destination slot, flat order kept within a destination (``-1`` dropped)."""
    phy = topk_phy.reshape(-1).long()
    dest = torch.where(phy >= 0, phy // experts_per_slot, num_slots)
    order = torch.argsort(dest, stable=True)
    counts = torch.bincount(dest, minlength=num_slots + 1)[:num_slots]
    return order[: int(counts.sum())], counts


NCCL_MIN_TIMEOUT_S = 60.0


class NcclFabric(Fabric):
    """Dispatch/combine of one slot over the default process group (see the module docstring).

    ``device``: where tensors live (``cpu``: the group must be gloo; ``cuda:i``: NCCL).
    """

    def __init__(
        self,
        slot: int,
        cfg: FabricConfig,
        store_addr: str | None = None,
        device: torch.device | str = "cpu",
        init_timeout_s: float = 60.0,
    ):
        self.slot, self.cfg, self.device = slot, cfg, torch.device(device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        floor = NCCL_MIN_TIMEOUT_S if backend == "nccl" else 0.0
        self._owns_group = ensure_process_group(
            store_addr, slot, cfg.num_slots, backend, max(init_timeout_s, floor), self.device
        )
        self._timeout = timedelta(seconds=cfg.exchange_timeout_s)  # gloo's per-collective bound
        self._row_bytes = cfg.hidden * torch.empty((), dtype=cfg.dtype).element_size()
        self.epoch, self.members = 0, ()
        self._incarnations: dict[int, int] | None = None

    # --- start-up ----------------------------------------------------------------------------

    def warm_up(self, run: Callable[[], object] | None = None) -> None:
        """Nothing: a step is collective, so none runs without every peer."""

    def export(self) -> None:
        """Nothing to publish: peers meet in the process group."""
        return None

    # --- views -----------------------------------------------------------------------------

    def apply_view(self, epoch: int, members: dict[int, int]) -> None:
        """Accepts only every slot, with the incarnations of the first view applied: a process
        group cannot lose or re-admit a rank."""
        everyone = set(range(self.cfg.num_slots))
        if set(members) != everyone:
            raise MembershipFixed(
                f"slot {self.slot}: view {epoch} has members {sorted(members)}, but the nccl "
                f"fabric runs all {self.cfg.num_slots} slots or none; restart the cluster, or "
                "use an elastic fabric (shm, symm)."
            )
        if self._incarnations is not None and dict(members) != self._incarnations:
            raise MembershipFixed(
                f"slot {self.slot}: view {epoch} names restarted processes {dict(members)} "
                f"(process group formed by {self._incarnations}); restart the cluster."
            )
        self._incarnations = dict(members)
        self.epoch, self.members = epoch, tuple(sorted(members))

    def peers_started(self) -> None:
        """Cannot tell: a collective shows nothing before every rank joins it."""
        return None

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    # --- the exchange ----------------------------------------------------------------------

    @property
    def graph_safe(self) -> bool:
        return False  # the split sizes reach the host before the rows are exchanged

    def end_step(self) -> None:
        """Nothing: every collective raises on its own (:class:`CollectiveFailed`)."""

    def dispatch(
        self, x: torch.Tensor, topk_phy: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[NcclRecv, NcclHandle]:
        """Send each ``(t, k)`` row of ``x`` ``[T, H]`` to the slot of physical expert
        ``topk_phy[t, k]`` (``[T, K]`` int, ``-1``: dropped)."""
        cfg = self.cfg
        if x.shape[0] > cfg.max_tokens:
            raise ValueError(
                f"{x.shape[0]} tokens exceed the fabric's max_tokens {cfg.max_tokens}; "
                "the engine must chunk its steps."
            )
        order, counts = plan_sends(topk_phy, cfg.experts_per_slot, cfg.num_slots)
        recv_counts = torch.empty_like(counts)
        self._all_to_all(recv_counts, counts, None, None, "dispatch counts")
        send_counts, recv_list = counts.tolist(), recv_counts.tolist()
        local = (topk_phy.reshape(-1).long()[order] % cfg.experts_per_slot).to(torch.int32)
        rows = x.to(cfg.dtype)[order // cfg.topk].contiguous()
        payload = torch.cat([rows.view(torch.uint8), local.view(-1, 1).view(torch.uint8)], 1)
        got = torch.empty(sum(recv_list), payload.shape[1], dtype=torch.uint8, device=x.device)
        self._all_to_all(got, payload, recv_list, send_counts, "dispatch rows")
        # fresh row-major copies: a one-row slice counts as contiguous while keeping the
        # packed row stride, and a dtype view needs a row stride the element size divides
        rows, n = self._row_bytes, got.shape[0]
        recv_x = torch.empty(n, rows, dtype=torch.uint8, device=got.device)
        recv_x = recv_x.copy_(got[:, :rows]).view(cfg.dtype)
        recv_le = torch.empty(n, got.shape[1] - rows, dtype=torch.uint8, device=got.device)
        recv_le = recv_le.copy_(got[:, rows:]).view(torch.int32).view(-1).long()
        recv = NcclRecv(recv_x, recv_le, recv_list)
        handle = NcclHandle(order, send_counts, recv_list, topk_weights, x.shape[0])
        return recv, handle

    def combine(self, y: torch.Tensor, handle: NcclHandle) -> torch.Tensor:
        """Send expert outputs ``y`` ``[N, H]`` (rows of the dispatch's ``recv``) back; return
        this slot's weighted sum ``[T, H]`` (cfg.dtype) over its top-k outputs."""
        cfg = self.cfg
        back = torch.empty(len(handle.order), cfg.hidden, dtype=cfg.dtype, device=y.device)
        sent = y.to(cfg.dtype).contiguous()
        self._all_to_all(back, sent, handle.send_counts, handle.recv_counts, "combine")
        shape = (handle.num_tokens * cfg.topk, cfg.hidden)
        per_k = torch.zeros(shape, dtype=cfg.dtype, device=y.device)
        per_k[handle.order] = back
        return weighted_sum(per_k, handle.topk_weights)

    def _all_to_all(self, out, inp, out_splits, in_splits, what: str) -> None:
        try:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, async_op=True)
            if self.device.type == "cuda":
                # stream-ordered, as any NCCL EP layer waits: a timeout here would make the
                # host poll the collective's event with a sleep between polls (a fixed cost
                # per exchange that an ordinary baseline does not pay); the group's watchdog
                # bounds it instead
                work.wait()
            else:
                work.wait(self._timeout)  # gloo honours this bound
        except RuntimeError as exc:  # dist.DistError is one
            raise CollectiveFailed(
                f"slot {self.slot} epoch {self.epoch}: {what} all_to_all failed ({exc}); a "
                "peer died or stalled, and the fixed-membership fabric cannot continue: "
                "restart the cluster."
            ) from exc
