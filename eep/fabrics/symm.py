"""The ``symm`` fabric: ``eep.kernels.symm_buffer.SymmEpBuffer`` behind the engine's interface.

**GPU-untested**: written against the kernels' API and their GPU tests
(``tests/kernels/_gpu_workers.py``) on a machine without a GPU; its own test
(``tests/eep/test_symm_fabric_gpu.py``, ``multigpu``) has not run yet.

What the adapter adds to the kernels:
- ``apply_view(epoch, members)`` copies the rank mask and the epoch into the kernels'
  ``DeviceView`` in place and resets the step counter, which every live rank must do at the
  same step boundary (the kernels tag flags with ``(epoch, step)``);
- the engine wants the received rows compacted (``recv.x`` ``[N, H]``, ``recv.local_expert``
  ``[N]``), the kernels hand over ``[L, S * C, H]`` with ``recv_m`` ``[L, S]`` valid rows; the
  compaction keeps expert-major, then sender, then flat ``t * K + k`` order, so each expert sees
  its rows in the order the shm and nccl fabrics give them;
- the kernels report a failed wait in ``status``/``suspect_mask`` without syncing the host;
  the adapter reads them after each wait (it syncs anyway to compact) and raises
  :class:`ExchangeFailed`;
- combine sums the returned rows with ``weighted_sum`` (``reduce_in_kernel=False``, the
  default), the math of every other path, so tokens are bit-identical across fabrics; the
  kernel's own float32 reduction (``reduce_in_kernel=True``) rounds differently in bf16.

Membership: the symmetric buffers are mapped once, collectively, by the ranks present at
start. Slots may leave (their buffers stay mapped, stores into them never fault); a restarted
slot cannot rejoin (its new buffer is not mapped here): :meth:`apply_view` raises
:class:`RejoinUnsupported` for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eep.engine.moe_exec import weighted_sum
from eep.kernels.config import EpConfig
from eep.kernels.view import DeviceView

from .base import ExchangeFailed, FabricConfig, FailureReason

log = logging.getLogger(__name__)

_STATUS_TIMEOUT, _STATUS_NEWER_EPOCH = 1, 2  # eep.kernels.ep_comm_kernels (needs Triton)


class RejoinUnsupported(ValueError):
    """A view re-admits a slot with a new incarnation; the symm buffers cannot map it."""


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


class SymmFabric:
    """Dispatch/combine of one slot over a :class:`SymmEpBuffer` (collective construction: every
    rank of ``group``, rank = slot). ``view`` is the ``DeviceView`` the kernels read, shared with
    the engine's ``ViewState`` where captured graphs must see one set of tensors."""

    def __init__(
        self,
        slot: int,
        cfg: FabricConfig,
        view: DeviceView | None = None,
        newest_epoch: Callable[[], int] = lambda: 0,
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        elastic: bool = True,
        reduce_in_kernel: bool = False,
    ):
        from eep.kernels.symm_buffer import SymmEpBuffer  # Triton + CUDA: import on use

        self.device = torch.device(device or f"cuda:{torch.cuda.current_device()}")
        self.slot, self.cfg, self.newest_epoch = slot, cfg, newest_epoch
        self.elastic, self.reduce_in_kernel = elastic, reduce_in_kernel
        self.view = view or device_view_for(cfg.num_slots, self.device)
        ep_cfg = EpConfig(
            num_slots=cfg.num_slots,
            experts_per_slot=cfg.experts_per_slot,
            hidden=cfg.hidden,
            topk=cfg.topk,
            max_tokens=cfg.max_tokens,
            dtype=cfg.dtype,
            timeout_us=max(1, int(cfg.timeout_s * 1e6)),
            elastic=elastic,
        )
        self.buf = SymmEpBuffer(ep_cfg, self.view, group, self.device)
        if self.buf.rank != slot:
            raise ValueError(f"slot {slot} is rank {self.buf.rank} of the group; rank = slot.")
        self._group = group
        s, e, c = cfg.num_slots, cfg.experts_per_slot, cfg.max_tokens
        self._y = torch.zeros(e, s * c, cfg.hidden, dtype=cfg.dtype, device=self.device)
        self._row_pos = torch.arange(c, device=self.device)
        self.epoch, self.members = 0, ()
        self._incarnations: dict[int, int] = {}

    # --- views -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Collective, once, before the first view: one exchange at epoch 0 compiles the kernels
        on every rank. Ranks compile at different speeds, so it may time out; its flags carry
        epoch 0 and never match a step of epoch >= 1."""
        saved = self.view.rank_mask.clone()
        self.view.rank_mask.fill_(1)
        x = torch.zeros(1, self.cfg.hidden, dtype=self.cfg.dtype, device=self.device)
        phy = torch.arange(self.cfg.topk, dtype=torch.int32, device=self.device)[None, :]
        w = torch.zeros(1, self.cfg.topk, device=self.device)
        recv_x, handle = self.buf.dispatch(x, phy, w)
        self.buf.combine(recv_x, handle)
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self._group, device_ids=[self.device.index])
        self.view.rank_mask.copy_(saved)
        self.buf.set_step(0)

    def apply_view(self, epoch: int, members: dict[int, int]) -> None:
        """Serve ``epoch`` with ``members`` (``{slot: incarnation}``): mask and epoch copied in
        place, step counter reset. Every live slot must apply epoch N before its first step of
        N, or its peers wait on flags still tagged with N - 1 (and abandon when they see N)."""
        if self.slot not in members:
            raise ValueError(f"slot {self.slot}: view {epoch} does not include this slot.")
        back = [s for s, inc in members.items() if self._incarnations.get(s, inc) != inc]
        if back:
            raise RejoinUnsupported(
                f"slot {self.slot}: view {epoch} re-admits slots {back} with new incarnations; "
                "the symm fabric maps peers' buffers once at start. Restart the cluster."
            )
        self._incarnations.update(members)
        mask = torch.zeros(self.cfg.num_slots, dtype=torch.int32)
        mask[list(members)] = 1
        self.view.rank_mask.copy_(mask, non_blocking=True)
        self.view.epoch.fill_(epoch)
        self.buf.set_step(0)
        self.epoch, self.members = epoch, tuple(sorted(members))
        log.debug("slot %d: symm fabric serves epoch %d with %s", self.slot, epoch, self.members)

    def close(self) -> None:
        """The symmetric buffer is freed with this object (after every peer stopped)."""
        self.buf = None

    # --- the exchange ----------------------------------------------------------------------

    def dispatch(
        self, x: torch.Tensor, topk_phy: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[SymmRecv, SymmHandle]:
        """``x`` ``[T, H]``, ``topk_phy`` ``[T, K]`` int (``-1``: dropped), ``topk_weights``
        ``[T, K]`` -> the rows this slot's experts must run (see :class:`SymmRecv`)."""
        cfg = self.cfg
        recv_x, handle = self.buf.dispatch(
            x.to(cfg.dtype), topk_phy.to(torch.int32), topk_weights.float()
        )
        self._check_status("dispatch")
        valid = self._row_pos < handle.recv_m.unsqueeze(-1).long()  # [L, S, C]
        rows = valid.view(-1).nonzero().view(-1)
        per_expert = cfg.num_slots * cfg.max_tokens
        recv = SymmRecv(recv_x.view(-1, cfg.hidden)[rows], rows // per_expert, rows)
        return recv, SymmHandle(handle, rows)

    def combine(self, y: torch.Tensor, handle: SymmHandle) -> torch.Tensor:
        """Expert outputs ``y`` ``[N, H]`` (rows of the dispatch's ``recv``) -> ``[T, H]``."""
        cfg, kh = self.cfg, handle.kernel
        self._y.view(-1, cfg.hidden).index_copy_(0, handle.rows, y.to(cfg.dtype))
        if self.reduce_in_kernel:
            out = self.buf.combine(self._y, kh)
            self._check_status("combine")
            return out
        self.buf.combine_send(self._y, kh)
        self.buf._launch_wait(is_dispatch=False)  # the wait half of combine_recv
        self._check_status("combine")
        per_k = self.buf._combine_buf[: kh.num_tokens * cfg.topk]
        ok = kh.topk_phy.reshape(-1) >= 0
        if self.elastic:  # entries of a dead or suspect slot hold stale rows
            slot = kh.topk_phy.reshape(-1).long().clamp(min=0) // cfg.experts_per_slot
            ok &= (self.view.rank_mask[slot] != 0) & (self.buf.suspect_mask[slot] == 0)
        per_k = torch.where(ok.unsqueeze(-1), per_k, torch.zeros((), dtype=per_k.dtype))
        return weighted_sum(per_k, kh.topk_weights.to(cfg.dtype))

    def _check_status(self, phase: str) -> None:
        if not self.elastic:
            return
        status = int(self.buf.status.item())  # host sync: the step's outcome
        newest = self.newest_epoch()
        if status & _STATUS_NEWER_EPOCH or newest > self.epoch:
            flags = self.buf._dispatch_flag if phase == "dispatch" else self.buf._combine_flag
            seen = max(newest, int((flags >> 32).max()))
            raise ExchangeFailed(FailureReason.NEWER_EPOCH, self.epoch, newer_epoch=seen)
        if status & _STATUS_TIMEOUT:
            suspects = tuple(self.buf.suspect_mask.nonzero().view(-1).tolist())
            raise ExchangeFailed(FailureReason.TIMEOUT, self.epoch, suspects)
