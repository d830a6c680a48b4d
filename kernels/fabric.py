"""``EpFabric``: dispatch and combine over receive buffers that peers address by pointer.

This layer owns the per-rank state (step counter, done counters, per-step results) and launches
the kernels of ``ep_comm_kernels``; it never syncs the host, so a whole step can be captured
in a CUDA graph. Where the buffers come from is the subclass's business: ``SymmEpBuffer``
(``symm_buffer.py``) allocates them in torch symmetric memory; the CPU tests hand in plain
host tensors of several simulated ranks and run the phases rank by rank in the interpreter.

Each step is ``dispatch_send`` -> ``dispatch_recv`` -> (expert MLP) -> ``combine_send`` ->
``combine_recv``; ``dispatch``/``combine`` run the two halves back to back. Every live rank
must take part in every step (with zero tokens if idle), or its peers time out on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from eep.kernels import ep_comm_kernels as k
from eep.kernels.config import EpConfig
from eep.kernels.view import DeviceView

_ALIGN = 256


@dataclass(frozen=True)
class FabricLayout:
    """Byte offsets of the regions of one rank's receive buffer (same on every rank)."""

    recv_x: int  # [L, S * C, H] dtype: dispatched rows, per local expert and sender
    recv_src_idx: int  # [L, S * C] int32: the sender's flat t * K + k of each row
    recv_weights: int  # [L, S * C] float32: the router weight of each row
    recv_count: int  # [S, L] int32: rows per (sender, local expert), written before the flag
    dispatch_flag: int  # [S] int64: (epoch << 32) | step, one word per sender
    combine_buf: int  # [C * K, H] dtype: expert outputs for this rank's (t, k) entries
    combine_flag: int  # [S] int64: one word per expert-owning slot
    nbytes: int

    @classmethod
    def for_config(cls, cfg: EpConfig) -> FabricLayout:
        elt = torch.empty((), dtype=cfg.dtype).element_size()
        rows = cfg.experts_per_slot * cfg.recv_rows_per_expert
        sizes = {
            "recv_x": rows * cfg.hidden * elt,
            "recv_src_idx": rows * 4,
            "recv_weights": rows * 4,
            "recv_count": cfg.num_slots * cfg.experts_per_slot * 4,
            "dispatch_flag": cfg.num_slots * 8,
            "combine_buf": cfg.max_tokens * cfg.topk * cfg.hidden * elt,
            "combine_flag": cfg.num_slots * 8,
        }
        offsets, cursor = {}, 0
        for name, size in sizes.items():
            offsets[name] = cursor
            cursor += -(-size // _ALIGN) * _ALIGN
        return cls(nbytes=cursor, **offsets)


@dataclass(frozen=True)
class DispatchHandle:
    """What combine needs from its dispatch. Tensors are views of the fabric's buffers and are
    overwritten by the next step.

    ``topk_phy``/``topk_weights`` ``[T, K]`` as given to dispatch; ``recv_m`` ``[L, S]`` int32
    rows received per (local expert, sender), 0 for a sender that did not arrive;
    ``recv_src_idx`` ``[L, S * C]`` int32 and ``recv_weights`` ``[L, S * C]`` float32 per row.
    """

    topk_phy: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens: int
    recv_m: torch.Tensor
    recv_src_idx: torch.Tensor
    recv_weights: torch.Tensor


class EpFabric:
    """Dispatch/combine of one rank over peers' receive buffers.

    ``buf`` is this rank's receive buffer (``uint8``, ``FabricLayout.nbytes``, zeroed before any
    peer sends); ``peer_base`` ``[S]`` int64 holds every rank's buffer address as this device
    sees it. Per-step results, valid once the step's receive phase has run (stream-ordered):
    ``suspect_mask`` ``[S]`` int32 (1 = a live-marked peer did not deliver within
    ``cfg.exchange_timeout_s``), ``status`` ``[1]`` int32 (bit 1 timeout, bit 2 newer epoch
    seen: abandon the step). A step with a nonzero ``status`` is invalid and must be discarded
    by the caller. ``step_status``/``step_suspects`` OR those over every exchange since
    :meth:`reset_step_status`: an engine reads them once per step instead of after each wait.

    What the ``symm`` fabric's adapter reads beyond dispatch/combine: :meth:`combine_recv_rows`
    (combine's wait without its reduction), :meth:`newest_flag_epoch` (after a failed step) and
    :meth:`close`.
    """

    def __init__(
        self,
        cfg: EpConfig,
        rank: int,
        view: DeviceView,
        buf: torch.Tensor,
        peer_base: torch.Tensor,
    ) -> None:
        if view.num_slots != cfg.num_slots:
            raise ValueError(f"view has {view.num_slots} slots, config {cfg.num_slots}.")
        if not 0 <= rank < cfg.num_slots:
            raise ValueError(f"rank {rank} is outside the {cfg.num_slots} slots.")
        self.cfg, self.rank, self.view = cfg, rank, view
        self.layout = FabricLayout.for_config(cfg)
        if buf.dtype != torch.uint8 or buf.numel() < self.layout.nbytes:
            raise ValueError(f"fabric buffer must be uint8 of >= {self.layout.nbytes} bytes.")
        self.buf, self.peer_base = buf, peer_base
        dev = buf.device
        s, e, c = cfg.num_slots, cfg.experts_per_slot, cfg.max_tokens
        i32 = dict(dtype=torch.int32, device=dev)
        self.step = torch.zeros(1, **i32)
        self.recv_m = torch.zeros(e, s, **i32)
        self.suspect_mask = torch.zeros(s, **i32)
        self.status = torch.zeros(1, **i32)
        self.step_suspects = torch.zeros(s, **i32)
        self.step_status = torch.zeros(1, **i32)
        self._send_done = torch.zeros(s, **i32)
        self._combine_done = torch.zeros(s, **i32)
        self._send_list = torch.zeros(s * e, c, **i32)
        self.recv_x = self._region("recv_x", cfg.dtype, (e, s * c, cfg.hidden))
        self.recv_src_idx = self._region("recv_src_idx", torch.int32, (e, s * c))
        self.recv_weights = self._region("recv_weights", torch.float32, (e, s * c))
        self._recv_count = self._region("recv_count", torch.int32, (s, e))
        self._dispatch_flag = self._region("dispatch_flag", torch.int64, (s,))
        self._combine_buf = self._region("combine_buf", cfg.dtype, (c * cfg.topk, cfg.hidden))
        self._combine_flag = self._region("combine_flag", torch.int64, (s,))
        on_gpu = dev.type == "cuda"
        self._use_timer = on_gpu
        self._exact = on_gpu
        self._block_h = min(512 if cfg.hidden >= 4096 else 256, triton.next_power_of_2(cfg.hidden))
        self._num_h_blocks = triton.cdiv(cfg.hidden, self._block_h)
        self._block_scan = min(1024, triton.next_power_of_2(c * cfg.topk))

    def _region(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        start = getattr(self.layout, name)
        nbytes = torch.empty((), dtype=dtype).element_size()
        for n in shape:
            nbytes *= n
        return self.buf[start : start + nbytes].view(dtype).view(shape)

    def reset_step_status(self) -> None:
        """Zeroes ``step_status``/``step_suspects`` (stream-ordered): call once per engine step,
        after reading them. A slot in ``step_suspects`` is not waited for until then."""
        self.step_status.zero_()
        self.step_suspects.zero_()

    def set_step(self, value: int = 0) -> None:
        """Sets the step counter (stream-ordered). Every live rank must use the same counter
        within an epoch: reset it on all ranks when a new view is applied."""
        self.step.fill_(value)

    # -- dispatch --------------------------------------------------------------------------

    def dispatch_send(
        self, x: torch.Tensor, topk_phy: torch.Tensor, topk_weights: torch.Tensor
    ) -> DispatchHandle:
        """Stores this rank's rows into every destination's buffer and raises its flags.

        ``x`` ``[T, H]`` (cfg.dtype, rows may be strided), ``T <= max_tokens``; ``topk_phy``
        ``[T, K]`` int32 physical experts (``-1`` = dropped); ``topk_weights`` ``[T, K]`` float32.
        """
        cfg = self.cfg
        num_tokens = x.shape[0]
        if num_tokens > cfg.max_tokens or x.shape[1] != cfg.hidden or x.stride(1) != 1:
            raise ValueError(
                f"dispatch: x {tuple(x.shape)} must be [T <= {cfg.max_tokens}, {cfg.hidden}] "
                "with a contiguous last dimension."
            )
        if topk_phy.shape != (num_tokens, cfg.topk) or topk_weights.shape != topk_phy.shape:
            raise ValueError(f"dispatch: topk tensors must be [{num_tokens}, {cfg.topk}].")
        topk_phy = topk_phy.contiguous()
        topk_weights = topk_weights.contiguous()
        lay = self.layout
        grid = (cfg.num_physical_experts, self._num_h_blocks)
        k._dispatch_send_kernel[grid](
            x, topk_phy, topk_weights, self.view.rank_mask, self.view.epoch, self.step,
            self._send_list, self._send_done, self.peer_base,
            num_tokens, self.rank, x.stride(0), cfg.hidden,
            lay.recv_x, lay.recv_src_idx, lay.recv_weights, lay.recv_count, lay.dispatch_flag,
            TOPK=cfg.topk, EXPERTS_PER_SLOT=cfg.experts_per_slot, NUM_SLOTS=cfg.num_slots,
            MAX_TOKENS=cfg.max_tokens, BLOCK_SCAN=self._block_scan, BLOCK_M=16,
            BLOCK_H=self._block_h, NUM_H_BLOCKS=self._num_h_blocks, ELASTIC=cfg.elastic,
        )  # fmt: skip
        return DispatchHandle(
            topk_phy, topk_weights, num_tokens, self.recv_m, self.recv_src_idx, self.recv_weights
        )

    def dispatch_recv(self, handle: DispatchHandle) -> torch.Tensor:
        """Waits (bounded) for every live sender; returns ``recv_x`` ``[L, S * C, H]``, valid
        rows per ``handle.recv_m``. Advances the step counter."""
        self._launch_wait(is_dispatch=True)
        return self.recv_x

    def dispatch(
        self, x: torch.Tensor, topk_phy: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, DispatchHandle]:
        """``dispatch_send`` then ``dispatch_recv``: ``(recv_x [L, S * C, H], handle)``."""
        handle = self.dispatch_send(x, topk_phy, topk_weights)
        return self.dispatch_recv(handle), handle

    # -- combine ---------------------------------------------------------------------------

    def combine_send(self, y: torch.Tensor, handle: DispatchHandle) -> None:
        """Returns expert outputs ``y`` (``[L, S * C, H]`` or ``[L * S, C, H]``, the layout of
        ``recv_x``) to the ranks that sent the rows, and raises their combine flags."""
        cfg = self.cfg
        s, e, c = cfg.num_slots, cfg.experts_per_slot, cfg.max_tokens
        y = y.reshape(e * s, c, cfg.hidden)
        if y.stride(2) != 1:
            raise ValueError("combine: y needs a contiguous last dimension.")
        lay = self.layout
        grid = (e * s, self._num_h_blocks)
        k._combine_send_kernel[grid](
            y, handle.recv_m, handle.recv_src_idx, self.suspect_mask, self.view.rank_mask,
            self.view.epoch, self.step, self._combine_done, self.peer_base, self.rank,
            y.stride(0), y.stride(1), cfg.hidden, lay.combine_buf, lay.combine_flag,
            EXPERTS_PER_SLOT=e, NUM_SLOTS=s, MAX_TOKENS=c, BLOCK_M=16, BLOCK_H=self._block_h,
            NUM_H_BLOCKS=self._num_h_blocks, ELASTIC=cfg.elastic,
        )  # fmt: skip

    def combine_recv(self, handle: DispatchHandle, out: torch.Tensor | None = None) -> torch.Tensor:
        """Waits (bounded) for every live, non-suspect expert owner, then returns ``[T, H]``:
        ``sum_k w[t, k] * expert_output(t, k)`` over the entries that were delivered."""
        cfg = self.cfg
        self._launch_wait(is_dispatch=False)
        num_tokens = handle.num_tokens
        if out is None:
            out = torch.empty(num_tokens, cfg.hidden, dtype=cfg.dtype, device=self.buf.device)
        block_t = 8
        grid = (max(1, triton.cdiv(num_tokens, block_t)), self._num_h_blocks)
        k._combine_reduce_kernel[grid](
            self._combine_buf, handle.topk_phy, handle.topk_weights, self.view.rank_mask,
            self.suspect_mask, out, num_tokens, cfg.hidden, out.stride(0),
            TOPK=cfg.topk, EXPERTS_PER_SLOT=cfg.experts_per_slot, BLOCK_T=block_t,
            BLOCK_H=self._block_h, ELASTIC=cfg.elastic, EXACT_ROUNDING=self._exact,
        )  # fmt: skip
        return out

    def combine(
        self, y: torch.Tensor, handle: DispatchHandle, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``combine_send`` then ``combine_recv``; returns ``[T, H]``."""
        self.combine_send(y, handle)
        return self.combine_recv(handle, out)

    def combine_recv_rows(self, handle: DispatchHandle) -> torch.Tensor:
        """The wait of :meth:`combine_recv` without its reduction: waits (bounded) for every
        live, non-suspect expert owner, then returns the expert output of each of this rank's
        ``(t, k)`` entries, ``[T * K, H]`` in flat ``t * K + k`` order. A view of the receive
        buffer, overwritten by the next step; rows of dropped entries (``topk_phy < 0``) and of
        suspect slots are stale, for the caller to mask."""
        self._launch_wait(is_dispatch=False)
        return self._combine_buf[: handle.num_tokens * self.cfg.topk]

    def newest_flag_epoch(self) -> int:
        """The newest epoch any peer's dispatch or combine flag in this rank's buffer carries
        (a flag is ``(epoch << 32) | step``); syncs the host. After a step abandoned for a
        newer epoch, this says which epoch a peer was already in."""
        flags = torch.cat([self._dispatch_flag, self._combine_flag])
        return int((flags >> 32).max())

    def close(self) -> None:
        """Releases what this rank holds beyond its tensors (which torch frees): nothing here;
        ``IpcEpBuffer`` unmaps its peers and frees its driver allocation."""

    def _launch_wait(self, is_dispatch: bool) -> None:
        cfg = self.cfg
        flag = self._dispatch_flag if is_dispatch else self._combine_flag
        timeout_ns = max(1, round(cfg.exchange_timeout_s * 1e9))  # the kernel counts ns
        k._wait_kernel[(1,)](
            flag, self._recv_count, self.recv_m, self.suspect_mask, self.status,
            self.step_suspects, self.step_status, self.view.rank_mask, self.view.epoch,
            self.step, timeout_ns,
            NUM_SLOTS=cfg.num_slots, EXPERTS_PER_SLOT=cfg.experts_per_slot,
            BLOCK_S=k.next_pow2(cfg.num_slots), BLOCK_L=k.next_pow2(cfg.experts_per_slot),
            IS_DISPATCH=is_dispatch, ELASTIC=cfg.elastic, USE_GLOBALTIMER=self._use_timer,
        )  # fmt: skip
