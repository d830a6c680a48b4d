"""The ``te`` fabric: the ``shm`` protocol across hosts, over the Mooncake Transfer Engine.

Every slot keeps the ``shm`` fabric's segment (one dispatch and one combine mailbox per
possible sender, flags tagged ``(epoch, seq)``) and registers it with the rank's transfer
engine. A peer on the same host (same ``host_id``) maps the segment and writes into it as in
``shm``; a peer on another host writes into it with the engine's one-sided writes (TCP here,
RDMA where the hosts have NICs):

1. the sender lays the rows out in its own *outbox*, a registered copy of one segment indexed
   by destination instead of sender, exactly as they must land;
2. it writes the count, the indices and the rows into the destination's mailbox, every remote
   destination's writes in flight at once, and waits for them;
3. only then it writes the flag (8 bytes), again for every remote destination at once.

The flag is written only after the data's writes completed. That is not enough: the TCP
transport reports a write complete once it is sent, and with packet loss the flag (a later,
separate write) can overtake data still being retransmitted; a write abandoned at an
exchange's deadline may also land later, over a newer exchange's data. So every remote post
carries a digest of its tag, count, indices and rows (:func:`digest`, in the mailbox's
``check`` word, written with the count). The receiver takes a remote sender's data only once
its copy matches the digest, polling until it does or the exchange's deadline passes (then the
exchange fails as ``TORN``). Without it, 1 % packet loss between hosts fed a stale count into
the combine (an index out of range); with it, the loss costs time, never a token.

The receiver's side is otherwise the ``shm`` fabric's: it polls the flags in its own segment,
with the same bounded wait, newer-epoch and torn-read checks. ``peers_started`` works as in
``shm``, since remote writers also land there.

A peer that does not answer (dead, partitioned, hung) costs a sender at most the exchange
timeout: the writes are polled against that deadline and abandoned after it, and the peer's
missing flag makes the wait report it as a suspect, as any missing sender. The engine's own
first contact with a peer (its handshake) is probed first, every new peer at once, within the
same deadline, calling ``on_wait`` meanwhile so the rank's progress keeps moving
(``MooncakeTransport.probe_many``); a peer that failed is probed again at its next exchange.
The exchange timeout bounds the whole exchange, posting included (as in ``shm``, where posting
takes no time).

Peers are found through ``FabricMember.peer_info(slot, incarnation)``: this fabric's
:meth:`export` (``host_id``, the engine's session, the segment's address), published under the
slot's lease. An incarnation's export never changes, so it is cached once read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from eep.transfer.errors import TransferError
from eep.transfer.transport import Op, PeerRef, Poll

from .base import ExchangeFailed, FabricConfig, FailureReason, PeerInfo
from .shm import ShmFabric, _Mailbox, _Segment, segment_path

log = logging.getLogger(__name__)


def digest(tag: int, meta: torch.Tensor, rows: torch.Tensor) -> int:
    """A 63-bit digest of one post: its tag, ``meta`` ``[n, M]`` int32 and ``rows`` ``[n, H]``
    (the bytes as int32 words, each weighted by its position; torch's int64 wraps)."""
    words = [meta.reshape(-1).view(torch.int32), rows.contiguous().view(-1).view(torch.int32)]
    flat = torch.cat(words).to(torch.int64)
    weighted = int((flat * torch.arange(1, flat.numel() + 1, dtype=torch.int64)).sum())
    return (tag * 1_000_003 + meta.shape[0] * 7_919 + weighted) & ((1 << 63) - 1)


@dataclass
class _Remote:
    """A peer on another host: where its segment is and the writes queued for it."""

    ref: PeerRef
    base: int  # the address of its segment in its process
    data: list[tuple[int, int, int]] = field(default_factory=list)  # (local, remote, nbytes)
    flags: list[tuple[int, int, int]] = field(default_factory=list)


class TeFabric(ShmFabric):
    """Dispatch/combine of one slot across hosts (see the module docstring).

    ``transport``: the rank's started ``MooncakeTransport`` (the one its weights and KV move
    through); ``host_id``: this host's identity, compared with the peers' to pick the path.
    """

    def __init__(
        self,
        cluster: str,
        slot: int,
        incarnation: int,
        cfg: FabricConfig,
        transport,
        host_id: str,
        peer_info: PeerInfo,
        newest_epoch: Callable[[], int] = lambda: 0,
        elastic: bool = True,
        on_wait: Callable[[], None] = lambda: None,
    ):
        super().__init__(cluster, slot, incarnation, cfg, newest_epoch, elastic, on_wait)
        self.transport, self.host_id, self.peer_info = transport, host_id, peer_info
        nbytes = _Segment.segment_nbytes(cfg)
        self.outbox_buf = torch.zeros(nbytes, dtype=torch.uint8)
        self.outbox = _Segment.lay_out(self.outbox_buf, cfg)
        transport.register(self.own.buf.data_ptr(), nbytes, "cpu:0")
        transport.register(self.outbox_buf.data_ptr(), nbytes, "cpu:0")
        self.remotes: dict[int, _Remote] = {}  # slot -> peer on another host, this epoch
        self._infos: dict[tuple[int, int], dict] = {}  # (slot, incarnation) -> its export
        self.stats = {"remote_posts": 0, "abandoned": 0, "late_data": 0, "digest_mismatch": 0}

    def export(self) -> dict:
        return {
            "host_id": self.host_id,
            "session": self.transport.session,
            "base": self.own.buf.data_ptr(),
            "nbytes": self.own.nbytes,
        }

    # --- views -----------------------------------------------------------------------------

    def apply_view(self, epoch: int, members: dict[int, int]) -> None:
        """As ``shm``, except that a peer on another host is reached through the engine: its
        segment is not mapped, its export is read instead."""
        if self.slot not in members:
            raise ValueError(f"slot {self.slot}: view {epoch} does not include this slot.")
        local: dict[int, int] = {}
        self.remotes = {}
        for slot, inc in members.items():
            info = None if slot == self.slot else self._info(slot, inc)
            if info is not None and info.get("host_id") != self.host_id:
                self.remotes[slot] = self._remote(slot, inc, info)
            elif slot != self.slot:
                local[slot] = inc
        for slot in [s for s in self.peers if s != self.slot and self.peers[s][0] != local.get(s)]:
            self.peers.pop(slot)[1].close()
        for slot, inc in local.items():
            if slot not in self.peers:
                try:
                    seg = _Segment(segment_path(self.cluster, slot, inc), self.cfg, create=False)
                except FileNotFoundError:  # not on this host after all: it cannot be reached
                    log.warning(
                        "slot %d epoch %d: slot %d inc %d has neither an export nor a segment "
                        "here; its exchanges will time out",
                        self.slot,
                        epoch,
                        slot,
                        inc,
                    )
                    continue
                self.peers[slot] = (inc, seg)
        self.epoch, self.seq, self.members = epoch, 0, tuple(sorted(members))
        log.info(
            "slot %d: te fabric serves epoch %d, local %s, remote %s",
            self.slot,
            epoch,
            sorted(self.peers),
            sorted(self.remotes),
        )

    def _info(self, slot: int, incarnation: int) -> dict | None:
        key = (slot, incarnation)
        if key not in self._infos:
            info = self.peer_info(slot, incarnation)
            if info is None:
                return None
            self._infos[key] = info
        return self._infos[key]

    def _remote(self, slot: int, incarnation: int, info: dict) -> _Remote:
        ref = PeerRef(f"slot {slot} inc {incarnation}", info["session"], "tcp", info["host_id"])
        return _Remote(ref, int(info["base"]))

    def close(self, unlink: bool = True) -> None:
        for buf in (self.own.buf, self.outbox_buf):
            try:
                self.transport.unregister(buf.data_ptr())
            except Exception as exc:  # noqa: BLE001 (closing: log and go on)
                log.warning("slot %d: unregistering the fabric: %s", self.slot, exc)
        super().close(unlink)

    # --- posting ---------------------------------------------------------------------------

    def _post(
        self, dest: int, combine: bool, meta: torch.Tensor, rows: torch.Tensor, tag: int
    ) -> None:
        remote = self.remotes.get(dest)
        if remote is None:
            if dest in self.peers:
                super()._post(dest, combine, meta, rows, tag)
            return  # neither mapped nor known: it cannot be reached; its wait suspects it
        box: _Mailbox = self.outbox[1 if combine else 0][dest]  # staged as it must land
        box.post(meta, rows, tag)
        n = rows.shape[0]
        box.check[0] = digest(tag, box.meta[:n], box.rows[:n])
        # where it lands: this slot's mailbox in the peer's segment (same layout as ours)
        theirs: _Mailbox = (self.own.combine if combine else self.own.dispatch)[self.slot]
        out, base = self.outbox_buf.data_ptr(), remote.base
        # the count and the digest, one 16-byte write
        remote.data.append((out + box.offset + 8, base + theirs.offset + 8, 16))
        if n:
            meta_nbytes = n * box.meta.shape[1] * box.meta.element_size()
            rows_nbytes = n * box.rows.shape[1] * box.rows.element_size()
            remote.data.append((out + box.meta_at, base + theirs.meta_at, meta_nbytes))
            remote.data.append((out + box.rows_at, base + theirs.rows_at, rows_nbytes))
        remote.flags.append((out + box.offset, base + theirs.offset, 8))  # the flag, last
        self.stats["remote_posts"] += 1

    def _read(
        self, sender: int, box: _Mailbox, tag: int, copy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``shm``; a remote sender's data is always copied, and taken once the copy matches
        its digest (the digest read first: data or digest still landing, or a late write, fail
        the match), polled until the exchange's deadline."""
        if sender not in self.remotes:
            return super()._read(sender, box, tag, copy)
        spins = 0
        while True:
            check, n = int(box.check[0]), int(box.count[0])
            if 0 <= n <= box.rows.shape[0]:
                meta, rows = box.meta[:n].clone(), box.rows[:n].clone()
                if digest(tag, meta, rows) == check:
                    if spins:
                        self.stats["late_data"] += 1
                    return meta, rows
            if time.monotonic() > self._deadline:
                self.stats["digest_mismatch"] += 1
                raise ExchangeFailed(FailureReason.TORN, self.epoch)
            self.on_wait()
            spins += 1
            time.sleep(0 if spins < 20 else 0.0002)

    def _flush(self) -> None:
        """Every remote destination's data, then (once all of it landed) every flag."""
        pending = [r for r in self.remotes.values() if r.flags]
        if not pending:
            return
        deadline = self._deadline  # the exchange's: posting and waiting share it
        unreachable = self.transport.probe_many(
            [r.ref for r in pending], self.on_wait, deadline - time.monotonic()
        )
        for exc in unreachable.values():
            log.warning("slot %d epoch %d: not sent: %s", self.slot, self.epoch, exc)
        reachable = [r for r in pending if r.ref.session not in unreachable]
        landed = self._write_all(reachable, "data", deadline)
        self._write_all(landed, "flags", deadline)
        for remote in pending:
            remote.data, remote.flags = [], []

    def _write_all(self, remotes: list[_Remote], what: str, deadline: float) -> list[_Remote]:
        """Start ``what`` (``data`` or ``flags``) of every remote, poll until each landed or
        the deadline; returns the remotes whose writes landed."""
        tickets = []
        for remote in remotes:
            writes = getattr(remote, what)
            try:
                local, at, nbytes = (list(col) for col in zip(*writes, strict=True))
                ticket = self.transport.submit_many(
                    Op.WRITE, remote.ref, local, at, nbytes, on_wait=self.on_wait
                )
            except TransferError as exc:
                log.warning(
                    "slot %d epoch %d: %s to %s not sent: %s",
                    self.slot,
                    self.epoch,
                    what,
                    remote.ref.holder,
                    exc,
                )
                continue
            tickets.append((remote, ticket))
        landed, spins = [], 0
        while tickets:
            for remote, ticket in list(tickets):
                state = self.transport.poll(ticket)
                if state is Poll.PENDING:
                    continue
                tickets.remove((remote, ticket))
                if state is Poll.DONE:
                    landed.append(remote)
                else:
                    log.warning(
                        "slot %d epoch %d: %s to %s failed",
                        self.slot,
                        self.epoch,
                        what,
                        remote.ref.holder,
                    )
            if not tickets or time.monotonic() > deadline:
                break
            self.on_wait()
            spins += 1
            time.sleep(0 if spins < 50 else 0.0002)
        for remote, _ in tickets:  # never answered: its flag will be missing over there
            self.stats["abandoned"] += 1
            self.transport.forget(remote.ref)
            log.warning(
                "slot %d epoch %d: %s to %s abandoned after the exchange timeout",
                self.slot,
                self.epoch,
                what,
                remote.ref.holder,
            )
        return landed
