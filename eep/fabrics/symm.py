"""The ``symm`` fabric: the Triton EP kernels over receive buffers shared by CUDA IPC.

What the adapter adds to the kernels (``eep.kernels.ipc_buffer.IpcEpBuffer``):
- membership: nothing collective. Each slot allocates its buffer alone and publishes
  :meth:`SymmFabric.export` (the runtime puts it in etcd under the slot's lease);
  ``apply_view(epoch, members)`` maps every member whose incarnation it has not mapped yet
  (``peer_info(slot, incarnation)`` finds the export), so a restarted slot is taken back in
  place: its new address goes into the kernels' ``peer_base`` tensor, the mask and the epoch
  are copied into the ``DeviceView`` in place, and the step counter is reset. Every live
  rank must do this at the same step boundary (the kernels tag flags with ``(epoch, step)``);
- the step's outcome is read once per engine step (:meth:`end_step`), not after each wait:
  the kernels OR every exchange's status into ``step_status`` and stop waiting for a slot
  that timed out earlier in the step, so a dead peer costs one bounded wait and the step is
  discarded at its end (:class:`ExchangeFailed`);
- :meth:`run_moe`: dispatch, the grouped SwiGLU GEMM straight on the receive buffer (row
  counts stay on the device, no host sync), combine, then ``weighted_sum`` in ``k`` order, the
  math of every other path (``run_experts`` on CUDA uses the same GEMM kernel and tiles), so
  tokens are identical across fabrics;
- :meth:`dispatch`/:meth:`combine` keep the compacting interface of the CPU fabrics (tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from eep.kernels.config import EpConfig
from eep.kernels.experts import expert_tiles, weighted_sum
from eep.kernels.view import DeviceView

from .base import ExchangeFailed, Fabric, FabricConfig, FailureReason, PeerInfo, RunExperts

log = logging.getLogger(__name__)

_STATUS_TIMEOUT, _STATUS_NEWER_EPOCH = 1, 2  # eep.kernels.ep_comm_kernels (needs Triton)


@dataclass(frozen=True)
class SymmRecv:
    """``x`` ``[N, H]`` the received rows (a copy), ``local_expert`` ``[N]`` int64,
    ``rows`` ``[N]`` int64 their positions in the flat ``[L * S * C]`` receive buffer."""

    x: torch.Tensor
    local_expert: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True)
class SymmHandle:
    kernel: object  # eep.kernels.fabric.DispatchHandle
    rows: torch.Tensor


def device_view_for(num_slots: int, device: torch.device | str) -> DeviceView:
    """A view of the kernels' own (dispatch/combine read only ``rank_mask`` and ``epoch``)."""
    return DeviceView.create(torch.zeros(num_slots), torch.full((1, 1), -1), [0], 0, device)


class SymmFabric(Fabric):
    """Dispatch/combine of one slot over an :class:`IpcEpBuffer`. ``view`` is the
    ``DeviceView`` the kernels read, shared with the engine's ``ViewState`` where captured
    graphs must see one set of tensors; ``peer_info(slot, incarnation)`` returns that
    incarnation's :meth:`export` (``None``: not published, the slot is gone)."""

    def __init__(
        self,
        slot: int,
        cfg: FabricConfig,
        view: DeviceView | None = None,
        newest_epoch: Callable[[], int] = lambda: 0,
        *,
        peer_info: PeerInfo = lambda slot, incarnation: None,
        device: torch.device | str | None = None,
        elastic: bool = True,
        buffer=None,
    ):
        self.device = torch.device(device or f"cuda:{torch.cuda.current_device()}")
        self.slot, self.cfg, self.newest_epoch = slot, cfg, newest_epoch
        self.peer_info, self.elastic = peer_info, elastic
        self.view = view or device_view_for(cfg.num_slots, self.device)
        ep_cfg = EpConfig(
            num_slots=cfg.num_slots,
            experts_per_slot=cfg.experts_per_slot,
            hidden=cfg.hidden,
            topk=cfg.topk,
            max_tokens=cfg.max_tokens,
            dtype=cfg.dtype,
            exchange_timeout_s=cfg.exchange_timeout_s,
            elastic=elastic,
        )
        if buffer is None:
            from eep.kernels.ipc_buffer import IpcEpBuffer  # Triton + CUDA: import on use

            buffer = IpcEpBuffer(ep_cfg, slot, self.view, self.device)
        self.buf = buffer  # tests pass an EpFabric over host memory (Triton interpreter)
        s, e, c = cfg.num_slots, cfg.experts_per_slot, cfg.max_tokens
        self._y = torch.zeros(e, s * c, cfg.hidden, dtype=cfg.dtype, device=self.device)
        self._row_pos = torch.arange(c, device=self.device)
        self.epoch, self.members = 0, ()
        self._incarnations: dict[int, int] = {}  # the incarnation mapped per peer slot

    # --- start-up ----------------------------------------------------------------------------

    def export(self) -> dict:
        """What a peer's ``peer_info`` must return for this slot (JSON-able); IPC only."""
        return self.buf.export()

    def warm_up(self, run: Callable[[], object] | None = None) -> None:
        """Compiles the kernels alone, before the first view: ``run`` (default: one exchange
        with itself) runs with only this slot in the mask, at epoch 0, whose flags never match
        a step of epoch >= 1. Nothing waits for a peer, so a restarted slot warms up while the
        others serve. With checks off the kernels assume every slot live (and mapped), so
        nothing can run alone: the first step compiles instead."""
        if not self.elastic:
            return
        saved_mask, saved_epoch = self.view.rank_mask.clone(), self.view.epoch.clone()
        self.view.rank_mask.zero_()
        self.view.rank_mask[self.slot] = 1
        self.view.epoch.zero_()
        self.buf.set_step(0)
        if run is None:
            x = torch.zeros(1, self.cfg.hidden, dtype=self.cfg.dtype, device=self.device)
            k = torch.arange(self.cfg.topk, device=self.device) % self.cfg.experts_per_slot
            phy = (self.slot * self.cfg.experts_per_slot + k).to(torch.int32)[None, :]
            w = torch.zeros(1, self.cfg.topk, device=self.device)
            recv_x, handle = self.buf.dispatch(x, phy, w)
            self.buf.combine(recv_x, handle)
        else:
            run()
        self._sync()
        status = int(self.buf.step_status.item())
        if status:
            raise RuntimeError(f"slot {self.slot}: the warm-up exchange failed (status {status})")
        self.view.rank_mask.copy_(saved_mask)
        self.view.epoch.copy_(saved_epoch)
        self.buf.set_step(0)
        self.buf.reset_step_status()

    # --- views -----------------------------------------------------------------------------

    def apply_view(self, epoch: int, members: dict[int, int]) -> None:
        """Serve ``epoch`` with ``members`` (``{slot: incarnation}``): new incarnations
        mapped, mask and epoch copied in place, step counter and step status reset. A member
        whose buffer cannot be found (it died before this rank read its export) is left out
        of this rank's mask: its peers time out on it and the next view removes it."""
        if self.slot not in members:
            raise ValueError(f"slot {self.slot}: view {epoch} does not include this slot.")
        if members[self.slot] != self._incarnations.setdefault(self.slot, members[self.slot]):
            raise ValueError(f"slot {self.slot}: view {epoch} names another incarnation of it.")
        live = []
        for s, inc in sorted(members.items()):
            if s != self.slot and self._incarnations.get(s) != inc:
                info = self.peer_info(s, inc)
                if info is None:
                    log.warning(
                        "slot %d: view %d names slot %d incarnation %d, which published no "
                        "fabric buffer; leaving it out",
                        self.slot,
                        epoch,
                        s,
                        inc,
                    )
                    continue
                self.buf.map_peer(s, info)
                self._incarnations[s] = inc
                log.info("slot %d: mapped slot %d incarnation %d", self.slot, s, inc)
            live.append(s)
        mask = torch.zeros(self.cfg.num_slots, dtype=torch.int32)
        mask[live] = 1
        self.view.rank_mask.copy_(mask)
        self.view.epoch.fill_(epoch)
        self.buf.set_step(0)
        self.buf.reset_step_status()
        self.epoch, self.members = epoch, tuple(live)
        log.debug("slot %d: symm fabric serves epoch %d with %s", self.slot, epoch, self.members)

    def peers_started(self) -> None:
        """Cannot tell without a host sync on the device flags: every live slot steps."""
        return None

    def close(self) -> None:
        """Unmaps the peers and frees the buffer (after every peer stopped sending)."""
        if self.buf is not None:
            self.buf.close()
        self.buf = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- the step --------------------------------------------------------------------------

    @property
    def graph_safe(self) -> bool:
        return self.device.type == "cuda"  # run_moe keeps row counts and status on the device

    def end_step(self) -> None:
        """Once per engine step, after its last exchange: raises :class:`ExchangeFailed` if
        any exchange of the step timed out or met a peer in a newer epoch (the one host
        sync). A step whose exchanges all completed is valid under the view it ran in."""
        if not self.elastic:
            return
        status = int(self.buf.step_status.item())
        if not status:
            return  # every exchange completed: valid, even if a newer view exists by now
        suspects = tuple(self.buf.step_suspects.nonzero().view(-1).tolist())
        self.buf.reset_step_status()
        if status & _STATUS_NEWER_EPOCH:
            seen = max(self.newest_epoch(), self.buf.newest_flag_epoch())
            raise ExchangeFailed(FailureReason.NEWER_EPOCH, self.epoch, newer_epoch=seen)
        raise ExchangeFailed(FailureReason.TIMEOUT, self.epoch, suspects)

    def run_moe(
        self,
        moe,
        x: torch.Tensor,
        topk_phy: torch.Tensor,
        topk_weights: torch.Tensor,
        run_experts: RunExperts | None = None,
    ) -> torch.Tensor:
        """One MoE layer without a host sync: ``x`` ``[T, H]`` -> ``[T, H]`` (``x.dtype``).
        The experts run as the grouped SwiGLU GEMM on the receive buffer, the kernel and tiles
        the engine's ``run_experts`` uses on CUDA, so ``run_experts`` itself is not called."""
        from eep.kernels.grouped_gemm import grouped_swiglu

        cfg, tiles = self.cfg, expert_tiles()
        s, e, c = cfg.num_slots, cfg.experts_per_slot, cfg.max_tokens
        recv_x, kh = self.buf.dispatch(
            x.to(cfg.dtype), topk_phy.to(torch.int32), topk_weights.float()
        )
        y = grouped_swiglu(
            recv_x.view(e * s, c, cfg.hidden),
            kh.recv_m.view(-1),
            moe.w_gate_up,
            moe.w_down,
            groups_per_expert=s,
            out=self._y.view(e * s, c, cfg.hidden),
            gate_up_tiles=tiles,
            down_tiles=tiles,
        )
        return self._combine_rows(y, kh).to(x.dtype)

    # --- the compacting interface of the CPU fabrics -----------------------------------------

    def dispatch(
        self, x: torch.Tensor, topk_phy: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[SymmRecv, SymmHandle]:
        """``x`` ``[T, H]``, ``topk_phy`` ``[T, K]`` int (``-1``: dropped), ``topk_weights``
        ``[T, K]`` -> the rows this slot's experts must run (see :class:`SymmRecv`)."""
        cfg = self.cfg
        recv_x, handle = self.buf.dispatch(
            x.to(cfg.dtype), topk_phy.to(torch.int32), topk_weights.float()
        )
        valid = self._row_pos < handle.recv_m.unsqueeze(-1).long()  # [L, S, C]
        rows = valid.view(-1).nonzero().view(-1)
        per_expert = cfg.num_slots * cfg.max_tokens
        recv = SymmRecv(recv_x.view(-1, cfg.hidden)[rows], rows // per_expert, rows)
        return recv, SymmHandle(handle, rows)

    def combine(self, y: torch.Tensor, handle: SymmHandle) -> torch.Tensor:
        """Expert outputs ``y`` ``[N, H]`` (rows of the dispatch's ``recv``) -> ``[T, H]``."""
        self._y.view(-1, self.cfg.hidden).index_copy_(0, handle.rows, y.to(self.cfg.dtype))
        return self._combine_rows(self._y, handle.kernel)

    def _combine_rows(self, y: torch.Tensor, kh) -> torch.Tensor:
        cfg = self.cfg
        self.buf.combine_send(y, kh)
        per_k = self.buf.combine_recv_rows(kh)
        # Dropped entries (-1) hold stale rows. So do entries of a suspect slot, but a suspect
        # fails the step (end_step), and routing never picks a slot outside the mask: with
        # checks on or off, only the dropped ones need masking here.
        dropped = kh.topk_phy.reshape(-1) < 0
        per_k = per_k.masked_fill(dropped.unsqueeze(-1), 0)  # no host tensor: graph-safe
        return weighted_sum(per_k, kh.topk_weights.to(cfg.dtype))
