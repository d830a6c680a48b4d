"""The ``shm`` fabric: dispatch/combine between CPU processes through POSIX shared memory.

It runs the same protocol as the GPU fabric, so CI can kill real processes:
- every slot owns one segment, ``/dev/shm/eep-<cluster>-fabric-<slot>-<incarnation>``, holding one
  dispatch mailbox and one combine mailbox per possible sender; a restarted slot gets a new
  segment (new incarnation), so a survivor never confuses the dead process's buffer with its
  successor's;
- a sender writes its rows (and their token/top-k/local-expert indices) into the destination's
  mailbox, then raises the mailbox flag to ``tag(epoch, seq)``; every live slot writes to every
  live slot in every exchange, with zero rows if it has none, so a missing flag means a
  missing sender;
- a receiver waits for the flags of every live sender with a bounded wait that backs off
  (several ranks share two cores in CI). A flag of a newer epoch, or a newer view seen by the
  local watcher, abandons the exchange at once; a sender that never arrives is reported as a
  suspect. After copying a mailbox the receiver re-reads its flag (a sequence lock), so data
  overwritten by a sender that moved on is never used.

Flags are 8-byte aligned int64 words written after the data; x86 keeps stores in order, and
readers load the flag before the data.

``elastic=False`` turns the checks off (the newer-epoch and newer-view checks, the per-sender
timeout and the torn-read re-check), as ``EpConfig.elastic=False`` does for the GPU kernels; it
exists only to measure their cost (``eep bench serve``). A dead peer then hangs the exchange
until a hang guard of ``_HANG_GUARD_S`` (not part of the protocol) gives up.
"""

from __future__ import annotations

import glob
import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import ExchangeFailed, Fabric, FabricConfig, FailureReason, make_tag, tag_epoch

log = logging.getLogger(__name__)

_ALIGN = 64
_HEADER = 64  # flag int64, count int64, check int64 (te: the data's digest), padding
_HANG_GUARD_S = 600.0  # checks off: only a wedged benchmark ever reaches this


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def segment_path(cluster: str, slot: int, incarnation: int) -> str:
    return f"/dev/shm/eep-{cluster}-fabric-{slot}-{incarnation}"


def remove_segments(cluster: str, slot: int | None = None, below: int | None = None) -> int:
    """Unlink the segments of ``cluster`` (of one slot, of incarnations below ``below``)."""
    pattern = f"/dev/shm/eep-{cluster}-fabric-{'*' if slot is None else slot}-*"
    removed = 0
    for path in glob.glob(pattern):
        incarnation = int(path.rsplit("-", 1)[1])
        if below is None or incarnation < below:
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


class _Mailbox:
    """One sender's box in a segment: ``flag``, ``count``, ``meta`` ``[cap, M]`` int32 and
    ``rows`` ``[cap, H]``."""

    @staticmethod
    def nbytes(cfg: FabricConfig, meta_cols: int) -> int:
        cap, elt = cfg.rows_per_sender, torch.empty((), dtype=cfg.dtype).element_size()
        return _HEADER + _aligned(cap * meta_cols * 4) + _aligned(cap * cfg.hidden * elt)

    def __init__(self, buf: torch.Tensor, offset: int, cfg: FabricConfig, meta_cols: int):
        cap, elt = cfg.rows_per_sender, torch.empty((), dtype=cfg.dtype).element_size()
        self.offset = offset  # from the segment's start: where a remote writer puts it
        self.flag = buf[offset : offset + 8].view(torch.int64)
        self.count = buf[offset + 8 : offset + 16].view(torch.int64)
        self.check = buf[offset + 16 : offset + 24].view(torch.int64)  # te: see digest()
        meta_at = offset + _HEADER
        meta_bytes = _aligned(cap * meta_cols * 4)
        self.meta = buf[meta_at : meta_at + cap * meta_cols * 4].view(torch.int32)
        self.meta = self.meta.view(cap, meta_cols)
        self.meta_at = meta_at
        rows_at = meta_at + meta_bytes
        self.rows_at = rows_at
        self.rows = buf[rows_at : rows_at + cap * cfg.hidden * elt].view(cfg.dtype)
        self.rows = self.rows.view(cap, cfg.hidden)

    def tag(self) -> int:
        return int(self.flag[0])

    def post(self, meta: torch.Tensor, rows: torch.Tensor, tag: int) -> None:
        n = rows.shape[0]
        if n:
            self.meta[:n].copy_(meta)
            self.rows[:n].copy_(rows)
        self.count[0] = n
        self.flag[0] = tag  # last: the receiver trusts the data once it sees this tag


class _Segment:
    """A slot's shared-memory segment: dispatch and combine mailboxes for every sender."""

    DISPATCH_META = 3  # token, top-k index, local expert
    COMBINE_META = 1  # the sender's flat t * K + k

    @classmethod
    def segment_nbytes(cls, cfg: FabricConfig) -> int:
        d = _Mailbox.nbytes(cfg, cls.DISPATCH_META)
        return cfg.num_slots * (d + _Mailbox.nbytes(cfg, cls.COMBINE_META))

    def __init__(self, path: str, cfg: FabricConfig, create: bool):
        self.path = path
        self.nbytes = self.segment_nbytes(cfg)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, self.nbytes)
            elif os.fstat(fd).st_size != self.nbytes:
                raise ValueError(
                    f"{path} has {os.fstat(fd).st_size} bytes, expected {self.nbytes}: the "
                    "ranks of one cluster must share one fabric configuration."
                )
            self._mmap = mmap.mmap(fd, self.nbytes)
        finally:
            os.close(fd)
        self.buf = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.dispatch, self.combine = self.lay_out(self.buf, cfg)

    @classmethod
    def lay_out(cls, buf: torch.Tensor, cfg: FabricConfig) -> tuple[list[_Mailbox], list[_Mailbox]]:
        """The dispatch and combine mailboxes of every sender over ``buf`` (``[nbytes]``
        uint8, :meth:`segment_nbytes` long)."""
        d = _Mailbox.nbytes(cfg, cls.DISPATCH_META)
        c = _Mailbox.nbytes(cfg, cls.COMBINE_META)
        dispatch = [_Mailbox(buf, s * d, cfg, cls.DISPATCH_META) for s in range(cfg.num_slots)]
        base = cfg.num_slots * d
        combine = [_Mailbox(buf, base + s * c, cfg, cls.COMBINE_META) for s in range(cfg.num_slots)]
        return dispatch, combine

    def close(self) -> None:
        self.dispatch = self.combine = []
        self.buf = None
        try:
            self._mmap.close()
        except BufferError:  # a tensor view is still alive; the mapping goes with it
            pass


@dataclass(frozen=True)
class ShmRecv:
    """What a destination received in one dispatch, grouped by sender.

    ``x`` ``[N, H]`` the rows; ``local_expert`` ``[N]`` int64 the local expert of each row;
    ``spans[s] = (start, end, meta)`` the rows of sender ``s`` with their ``[n, 3]`` indices.
    """

    x: torch.Tensor
    local_expert: torch.Tensor
    spans: dict[int, tuple[int, int, torch.Tensor]]


@dataclass(frozen=True)
class ShmHandle:
    """What combine needs from its dispatch."""

    recv: ShmRecv
    topk_weights: torch.Tensor  # [T, K] float32
    num_tokens: int
    seq: int


class ShmFabric(Fabric):
    """Dispatch/combine of one slot. Call :meth:`apply_view` before the first exchange and at
    every step boundary where a new view arrives.

    ``newest_epoch`` returns the newest epoch the local watcher has seen; a wait abandons the
    exchange as soon as it exceeds the epoch being served. ``elastic=False``: checks off (see
    the module docstring); same results, for overhead measurements only.
    """

    def __init__(
        self,
        cluster: str,
        slot: int,
        incarnation: int,
        cfg: FabricConfig,
        newest_epoch: Callable[[], int] = lambda: 0,
        elastic: bool = True,
        on_wait: Callable[[], None] = lambda: None,
    ):
        self.cluster, self.slot, self.incarnation, self.cfg = cluster, slot, incarnation, cfg
        self.newest_epoch, self.elastic = newest_epoch, elastic
        # called while waiting on peers: a rank that waits is healthy, and its lease (renewed
        # only while its progress moves) must not lapse because a peer is slow or dead
        self.on_wait = on_wait
        remove_segments(cluster, slot, below=incarnation)  # predecessors cannot clean up
        self.own = _Segment(segment_path(cluster, slot, incarnation), cfg, create=True)
        self.peers: dict[int, tuple[int, _Segment]] = {slot: (incarnation, self.own)}
        self.epoch, self.seq, self.members = 0, 0, ()
        self._deadline = 0.0  # when the exchange under way gives up on a missing sender

    # --- start-up ----------------------------------------------------------------------------

    def warm_up(self, run: Callable[[], object] | None = None) -> None:
        """Nothing: an exchange waits for every live peer, so no step runs alone (the CPU
        path compiles nothing either)."""

    def export(self) -> None:
        """Nothing to publish: peers open this slot's segment by its name (cluster, slot,
        incarnation)."""
        return None

    # --- views -----------------------------------------------------------------------------

    def apply_view(self, epoch: int, members: dict[int, int]) -> None:
        """Serve ``epoch`` with ``members`` (``{slot: incarnation}``); resets the sequence.

        Every live slot must apply epoch N before its first exchange of N, or its peers wait
        on a slot that is still tagging its flags with N-1 (they abandon when they see N).
        """
        if self.slot not in members:
            raise ValueError(f"slot {self.slot}: view {epoch} does not include this slot.")
        for slot in [
            s for s in self.peers if s != self.slot and self.peers[s][0] != members.get(s)
        ]:
            self.peers.pop(slot)[1].close()
        for slot, inc in members.items():
            if slot not in self.peers:
                self.peers[slot] = (
                    inc,
                    _Segment(segment_path(self.cluster, slot, inc), self.cfg, create=False),
                )
        self.epoch, self.seq, self.members = epoch, 0, tuple(sorted(members))
        log.debug("slot %d: fabric serves epoch %d with %s", self.slot, epoch, self.members)

    def close(self, unlink: bool = True) -> None:
        for _, seg in self.peers.values():
            seg.close()
        self.peers = {}
        if unlink:
            try:
                os.unlink(self.own.path)
            except FileNotFoundError:
                pass

    def peers_started(self) -> bool:
        """Whether a live peer has begun the next exchange. A slot with nothing to do joins a
        step only then, so an idle cluster does not step (and burn the CPU) at all, while
        one busy slot still gets every peer into its exchanges within a poll interval."""
        tag = make_tag(self.epoch, self.seq + 1)
        return any(self.own.dispatch[s].tag() == tag for s in self.members if s != self.slot)

    # --- the exchange ----------------------------------------------------------------------

    @property
    def graph_safe(self) -> bool:
        return False  # host tensors, host waits

    def end_step(self) -> None:
        """Nothing: every exchange checks its own senders (and raises) as it waits."""

    def dispatch(
        self, x: torch.Tensor, topk_phy: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[ShmRecv, ShmHandle]:
        """Send each ``(t, k)`` row of ``x`` ``[T, H]`` to the slot of physical expert
        ``topk_phy[t, k]`` (``[T, K]`` int, ``-1``: none live, the row is dropped)."""
        if x.shape[0] > self.cfg.max_tokens:
            raise ValueError(
                f"{x.shape[0]} tokens exceed the fabric's max_tokens "
                f"{self.cfg.max_tokens}; the engine must chunk its steps."
            )
        self.seq += 1
        self._deadline = time.monotonic() + self.cfg.exchange_timeout_s  # the whole exchange's
        tag = make_tag(self.epoch, self.seq)
        eps, num_tokens = self.cfg.experts_per_slot, x.shape[0]
        phy = topk_phy.long()
        flat = torch.arange(phy.numel()).view_as(phy)
        for dest in self.members:
            t_k = flat[(phy >= 0) & (phy // eps == dest)]
            t, k = t_k // self.cfg.topk, t_k % self.cfg.topk
            meta = torch.stack([t, k, phy.view(-1)[t_k] % eps], dim=1).to(torch.int32)
            self._post(dest, False, meta, x[t].to(self.cfg.dtype), tag)
        self._flush()
        boxes = {s: self.own.dispatch[s] for s in self.members}
        self._wait(boxes, tag)
        recv = self._collect(boxes, tag)
        return recv, ShmHandle(recv, topk_weights, num_tokens, self.seq)

    def combine(self, y: torch.Tensor, handle: ShmHandle) -> torch.Tensor:
        """Send expert outputs ``y`` ``[N, H]`` (rows of ``handle.recv``) back to their
        senders; return this slot's weighted sum ``[T, H]`` over its top-k outputs."""
        tag = make_tag(self.epoch, handle.seq)
        self._deadline = time.monotonic() + self.cfg.exchange_timeout_s
        for sender, (start, end, meta) in handle.recv.spans.items():
            flat = (meta[:, 0] * self.cfg.topk + meta[:, 1]).view(-1, 1)
            self._post(sender, True, flat, y[start:end], tag)
        self._flush()
        boxes = {s: self.own.combine[s] for s in self.members}
        self._wait(boxes, tag)
        k, h = self.cfg.topk, self.cfg.hidden
        per_k = torch.zeros(handle.num_tokens * k, h, dtype=self.cfg.dtype)
        for sender, box in boxes.items():
            meta, rows = self._read(sender, box, tag, copy=False)  # per_k takes the copy
            per_k[meta[:, 0].long()] = rows
        self._check_unchanged(boxes, tag)
        weights = handle.topk_weights.to(self.cfg.dtype).view(-1, k, 1)
        return (per_k.view(-1, k, h) * weights).sum(dim=1)

    def _post(
        self, dest: int, combine: bool, meta: torch.Tensor, rows: torch.Tensor, tag: int
    ) -> None:
        """Put ``rows`` (with their ``meta``) in this slot's mailbox at ``dest``, flag last."""
        seg = self.peers[dest][1]
        (seg.combine if combine else seg.dispatch)[self.slot].post(meta, rows, tag)

    def _flush(self) -> None:
        """After an exchange's posts: nothing here (every post is already in place)."""

    def _read(self, sender: int, box: _Mailbox, tag: int, copy: bool = True):
        """``sender``'s ``meta`` ``[n, M]``, ``rows`` ``[n, H]``: copies (``copy=False``: views)."""
        n = int(box.count[0])
        meta, rows = box.meta[:n], box.rows[:n]
        return (meta.clone(), rows.clone()) if copy else (meta, rows)

    def _collect(self, boxes: dict[int, _Mailbox], tag: int) -> ShmRecv:
        xs, experts, spans, start = [], [], {}, 0
        for sender, box in boxes.items():
            meta, rows = self._read(sender, box, tag)
            n = rows.shape[0]
            xs.append(rows)
            experts.append(meta[:, 2].long())
            spans[sender] = (start, start + n, meta)
            start += n
        self._check_unchanged(boxes, tag)
        x = torch.cat(xs) if xs else torch.zeros(0, self.cfg.hidden, dtype=self.cfg.dtype)
        local = torch.cat(experts) if experts else torch.zeros(0, dtype=torch.long)
        return ShmRecv(x, local, spans)

    def _check_unchanged(self, boxes: dict[int, _Mailbox], tag: int) -> None:
        if not self.elastic:
            return
        for box in boxes.values():
            now = box.tag()
            if now != tag:
                raise ExchangeFailed(FailureReason.TORN, self.epoch, newer_epoch=tag_epoch(now))

    def _wait(self, boxes: dict[int, _Mailbox], tag: int) -> None:
        """Bounded wait for every live sender's flag (spin briefly, then sleep)."""
        if not self.elastic:
            self._wait_unchecked(boxes, tag)
            return
        pending = dict(boxes)
        deadline = self._deadline  # set as the exchange began: posting counts against it
        spins = 0
        while True:
            for sender, box in list(pending.items()):
                seen = box.tag()
                if seen == tag:
                    del pending[sender]
                elif tag_epoch(seen) > self.epoch:
                    raise ExchangeFailed(
                        FailureReason.NEWER_EPOCH, self.epoch, newer_epoch=tag_epoch(seen)
                    )
            if not pending:
                return
            newest = self.newest_epoch()
            if newest > self.epoch:
                raise ExchangeFailed(FailureReason.NEWER_EPOCH, self.epoch, newer_epoch=newest)
            if time.monotonic() > deadline:
                raise ExchangeFailed(FailureReason.TIMEOUT, self.epoch, tuple(sorted(pending)))
            self.on_wait()
            spins += 1
            time.sleep(0 if spins < 20 else min(0.002, 0.00005 * spins))

    def _wait_unchecked(self, boxes: dict[int, _Mailbox], tag: int) -> None:
        """Checks off: wait for the flags only; the guard is read on the sleeping path alone."""
        pending = list(boxes.items())
        spins, guard = 0, None
        while True:
            pending = [(s, box) for s, box in pending if box.tag() != tag]
            if not pending:
                return
            spins += 1
            if spins < 20:
                time.sleep(0)
                continue
            guard = guard or time.monotonic() + _HANG_GUARD_S
            if time.monotonic() > guard:
                suspects = tuple(sorted(s for s, _ in pending))
                raise ExchangeFailed(FailureReason.TIMEOUT, self.epoch, suspects)
            time.sleep(min(0.002, 0.00005 * spins))
