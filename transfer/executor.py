"""The executor: runs a transfer plan, verifies every tensor, re-plans around failures.

One thread submits and polls; a small pool verifies checksums (and reads the checkpoint) as
tensors complete, so verification overlaps the transfer. Verification is batched: the tensors
whose bytes have all landed wait in one list, and each idle verifier takes its share of that
list as one batch, one checksum computation over all of it
(:func:`eep.transfer.checksum.range_checksums`: one kernel launch on CUDA, one vectorised pass
on the CPU) and one read of the results back to the host, so neither a launch nor a host sync
is paid per tensor. Each holder has up to ``max_inflight`` requests of at most
``chunk_nbytes`` in flight; a request past its deadline marks its holder hung. A holder that
fails (dead, unreachable, hung) is excluded and every tensor it had not delivered is re-planned
onto the others; a tensor whose bytes fail the checksum is re-planned with that (holder,
tensor) pair excluded, alone: the rest of its batch stands on its own checksums.

Hazard: an abandoned request to a hung holder cannot be cancelled in the engine, so its bytes
may still land later, over a copy fetched elsewhere. Such tensors are verified once more at
the end (and re-fetched if they changed).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from .arena import Arena, TensorSpec
from .checkpoint import Checkpoint
from .checksum import format_checksum, parse_checksum, range_checksums
from .config import TransferConfig
from .engine import Op, Poll, Ticket
from .errors import NoSource, PullTimeout, SourceFailed
from .manifest import Manifest
from .planner import DiskOp, ReadOp, Request, TransferPlan, plan_pull, requests_of

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
OnPlan = Callable[[TransferPlan], None]


@dataclass
class PullReport:
    """What a pull did: bytes and seconds, per-holder bytes, and every failure handled.

    ``corrupt``: (holder, tensor) pairs whose bytes failed their checksum; ``overwritten``:
    tensors that passed, then changed before the end (a hung holder's late write) and were
    fetched again; ``batches``: checksum computations run (each over many tensors).
    """

    nbytes: int = 0
    seconds: float = 0.0
    bytes_by_holder: dict[str, int] = field(default_factory=dict)
    failed_holders: dict[str, str] = field(default_factory=dict)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)
    from_disk: list[str] = field(default_factory=list)
    # tensor -> the manifest's checksum its bytes matched (the pulled ones, as they ended)
    verified: dict[str, str] = field(default_factory=dict)
    replans: int = 0
    batches: int = 0

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(eq=False, slots=True)
class _Batch:
    """Landed tensors verified together: one checksum computation, one read back."""

    reads: list[ReadOp]


@dataclass(slots=True)
class _InFlight:
    chunk: Request
    ticket: Ticket
    deadline: float


class Puller:
    """Pulls tensors of a local ``arena`` from the holders in the manifests."""

    def __init__(
        self, transport, arena: Arena, config: TransferConfig, progress: Progress | None = None
    ) -> None:
        self.transport, self.arena, self.config, self.progress = transport, arena, config, progress

    def pull(
        self,
        manifests: Sequence[Manifest],
        names: Sequence[str] | None = None,
        checkpoint: Checkpoint | None = None,
        exclude_holders: Sequence[str] = (),
        on_plan: OnPlan | None = None,
    ) -> PullReport:
        """Fill ``names`` (default: the whole layout) of the arena, verified. ``on_plan`` is
        called once with the first plan, before any read is submitted (what the worker
        reports as the pull's sources; a fault test may hold the pull open there)."""
        specs = [self.arena.layout[n] for n in names] if names else list(self.arena.layout.specs)
        run = _Run(self, list(manifests), specs, checkpoint, set(exclude_holders))
        return run.go(on_plan)


class _Run:
    """The state of one pull (see the module docstring)."""

    def __init__(
        self,
        puller: Puller,
        manifests: list[Manifest],
        specs: list[TensorSpec],
        checkpoint: Checkpoint | None,
        excluded: set[str],
    ) -> None:
        self.p, self.cfg, self.tr = puller, puller.config, puller.transport
        self.manifests = manifests
        self.peers = {m.holder: m.peer for m in manifests}
        self.specs = {s.name: s for s in specs}
        self.checkpoint = checkpoint
        self.excluded = excluded
        self.report = PullReport(nbytes=sum(s.nbytes for s in specs))
        self.queues: dict[str, deque[Request]] = {}
        self.inflight: dict[str, list[_InFlight]] = {}
        self.owner: dict[str, ReadOp] = {}  # tensor -> the read now responsible for it
        self.left: dict[str, int] = {}  # tensor -> chunks not yet landed
        self.got: dict[str, int] = {}  # tensor -> bytes landed from its current read
        # tensor -> the batch verifying it (None: landed, waiting in ``ready`` for a verifier);
        # a failing holder's tensors in here are not re-planned, their bytes are all in
        self.verifying: dict[str, _Batch | None] = {}
        self.ready: list[ReadOp] = []
        self.busy = 0  # verifiers at work: batches in the pool
        self.disk_jobs: dict[str, Future] = {}
        # (batch or tensor, future) pairs the pool finished, appended by done callbacks: the
        # loop reads only these, never scans every pending future (with thousands of tensors
        # that scan held the GIL and starved the verifying threads: 1.5 GB/s for 2048 tensors)
        self.finished: deque[tuple[_Batch | str, Future]] = deque()
        self.done: set[str] = set()
        self.tainted: set[str] = set()
        self.replan: set[str] = set()
        self.landed = 0

    # --- planning --------------------------------------------------------------------------

    def _plan(self, names: Sequence[str]) -> TransferPlan:
        try:
            plan = plan_pull(
                [self.specs[n] for n in names],
                self.manifests,
                local_host=self.cfg.host_id,
                checkpoint=self.checkpoint.names if self.checkpoint else (),
                exclude_holders=self.excluded,
                exclude_pairs=self.report.corrupt,
                remote_weight=self.cfg.remote_weight,
            )
        except NoSource as exc:
            reasons = "; ".join(f"{h}: {r}" for h, r in self.report.failed_holders.items())
            raise NoSource(exc.names, f"{exc} Failures: {reasons or 'none'}") from exc
        self._enqueue(plan)
        return plan

    def _enqueue(self, plan: TransferPlan) -> None:
        step = self.cfg.chunk_nbytes
        by = self.report.bytes_by_holder
        for holder, reads in plan.by_holder().items():
            by[holder] = by.get(holder, 0) + sum(r.nbytes for r in reads)
            for r in reads:
                self.owner[r.name] = r
                self.left[r.name] = 0
                self.got[r.name] = 0
            chunks = requests_of(reads, step)
            for c in chunks:
                for r, _ in c.parts:
                    self.left[r.name] += 1
            self.queues.setdefault(holder, deque()).extend(chunks)
        for d in plan.disk:
            self.owner.pop(d.name, None)
            self.disk_jobs[d.name] = self._watch(d.name, self.pool.submit(self._load_disk, d))

    # --- the loop --------------------------------------------------------------------------

    def go(self, on_plan: OnPlan | None = None) -> PullReport:
        t0 = time.monotonic()
        deadline = t0 + self.cfg.pull_timeout_s
        with ThreadPoolExecutor(self.cfg.verify_workers, thread_name_prefix="eep-verify") as pool:
            self.pool = pool
            plan = self._plan(list(self.specs))
            if on_plan is not None:
                on_plan(plan)
            idle = 0
            while len(self.done) < len(self.specs):
                if time.monotonic() > deadline:
                    raise PullTimeout(
                        f"pull of {len(self.specs)} tensors did not finish within "
                        f"{self.cfg.pull_timeout_s:.0f} s ({len(self.done)} done). Raise "
                        "pull_timeout_s or check the holders' links."
                    )
                moved = self._submit() + self._poll() + self._collect() + self._dispatch()
                if self.replan:
                    names, self.replan = sorted(self.replan), set()
                    self.report.replans += 1
                    self._plan(names)
                    moved += 1
                if len(self.done) == len(self.specs) and self.tainted:
                    moved += self._recheck_tainted()
                # back off while nothing moves: 50 us doubling to 2 ms, so a GPU pipeline of
                # millisecond requests is refilled promptly and CPU tests do not spin
                idle = 0 if moved else min(idle + 1, 6)
                if idle:
                    time.sleep(min(25e-6 * (1 << idle), 2e-3))
        self.report.seconds = time.monotonic() - t0
        return self.report

    def _submit(self) -> int:
        n = 0
        for holder, q in list(self.queues.items()):
            flying = self.inflight.setdefault(holder, [])
            while q and len(flying) < self.cfg.max_inflight and holder not in self.excluded:
                c = q.popleft()
                local = self.p.arena.addr + c.local_offset
                try:
                    t = self.tr.submit(Op.READ, self.peers[holder], local, c.remote_addr, c.nbytes)
                except SourceFailed as exc:
                    q.appendleft(c)
                    self._fail(holder, f"{exc.op}: {exc}")
                    break
                flying.append(_InFlight(c, t, time.monotonic() + self.cfg.deadline_s(c.nbytes)))
                n += 1
        return n

    def _poll(self) -> int:
        n, now = 0, time.monotonic()
        for holder, flying in list(self.inflight.items()):
            for f in list(flying):
                state = self.tr.poll(f.ticket)
                if state is Poll.DONE:
                    flying.remove(f)
                    self._landed(f.chunk)
                    n += 1
                elif state is Poll.FAILED:
                    self._fail(holder, f"read of {f.chunk.nbytes} bytes failed")
                    n += 1
                    break
                elif now > f.deadline:
                    self._fail(
                        holder,
                        f"timed out: a {f.chunk.nbytes}-byte read took more "
                        f"than {self.cfg.deadline_s(f.chunk.nbytes):.1f} s",
                        hung=True,
                    )
                    n += 1
                    break
        return n

    def _landed(self, c: Request) -> None:
        for r, nbytes in c.parts:
            name = r.name
            if self.owner.get(name) is not r:
                continue  # a late chunk of a read that was re-planned
            self.landed += nbytes
            self.got[name] += nbytes
            self.left[name] -= 1
            if self.left[name] == 0:
                self.verifying[name] = None
                self.ready.append(r)
        if self.p.progress:
            self.p.progress(self.landed, self.report.nbytes)

    def _dispatch(self) -> int:
        """Give each idle verifier an equal share of the landed tensors, as one batch."""
        n = 0
        while self.ready and self.busy < self.cfg.verify_workers:
            share = sum(r.nbytes for r in self.ready) / (self.cfg.verify_workers - self.busy)
            take, nbytes = 0, 0
            while take < len(self.ready) and (take == 0 or nbytes < share):
                nbytes += self.ready[take].nbytes
                take += 1
            batch = _Batch(self.ready[:take])
            del self.ready[:take]
            for r in batch.reads:
                self.verifying[r.name] = batch
            self.busy += 1
            self.report.batches += 1
            self._watch(batch, self.pool.submit(self._verify, batch.reads))
            n += 1
        return n

    def _verify(self, reads: list[ReadOp]) -> list[int]:
        """The checksums of ``reads``' bytes in the arena (one computation, one read back)."""
        offsets, sizes = [r.local_offset for r in reads], [r.nbytes for r in reads]
        return range_checksums(self.p.arena.buffer, offsets, sizes).tolist()

    def _load_disk(self, d: DiskOp) -> None:
        self.checkpoint.load_into(self.p.arena, self.specs[d.name])

    def _watch(self, token: _Batch | str, fut: Future) -> Future:
        fut.add_done_callback(lambda f: self.finished.append((token, f)))  # deque: thread-safe
        return fut

    def _collect(self) -> int:
        n = 0
        while self.finished:
            token, fut = self.finished.popleft()
            if isinstance(token, _Batch):
                self.busy -= 1
                for r, value in zip(token.reads, fut.result(), strict=True):
                    if self.verifying.get(r.name) is token:
                        del self.verifying[r.name]
                        self._checked(r, value)
                n += 1
                continue
            name = token
            if self.disk_jobs.get(name) is fut:
                del self.disk_jobs[name]
                fut.result()  # CheckpointError propagates
                self.report.from_disk.append(name)
                self.done.add(name)
                self.landed += self.specs[name].nbytes
                if self.p.progress:
                    self.p.progress(self.landed, self.report.nbytes)
            else:
                continue  # superseded (the tensor was re-planned meanwhile)
            n += 1
        return n

    def _checked(self, r: ReadOp, actual: int) -> None:
        if actual == parse_checksum(r.checksum):
            self.done.add(r.name)
            self.report.verified[r.name] = r.checksum
            return
        log.warning(
            "tensor %s from holder %s: checksum %s, manifest says %s; fetching it elsewhere",
            r.name,
            r.holder,
            format_checksum(actual),
            r.checksum,
        )
        self.report.corrupt.append((r.holder, r.name))
        self.landed -= self.got[r.name]
        self.owner.pop(r.name)
        self.replan.add(r.name)

    def _fail(self, holder: str, reason: str, hung: bool = False) -> None:
        """Exclude ``holder``; re-plan every tensor it has not delivered."""
        log.warning("holder %s failed (%s); re-planning around it", holder, reason)
        self.excluded.add(holder)
        self.report.failed_holders[holder] = reason
        for f in self.inflight.pop(holder, []):
            if hung:
                self.tainted.update(r.name for r, _ in f.chunk.parts)
        self.queues.pop(holder, None)
        for name, r in list(self.owner.items()):
            if r.holder == holder and name not in self.done and name not in self.verifying:
                self.landed -= self.got[name]
                self.owner.pop(name)
                self.replan.add(name)

    def _recheck_tainted(self) -> int:
        """Verify again the tensors an abandoned request might still have written over; one
        that changed is fetched again, from the same holder if need be: its bytes passed once,
        what changed them was the hung holder's late write."""
        names, self.tainted = sorted(self.tainted), set()
        reads = [self.owner[n] for n in names if n in self.owner]  # tensors from disk: no owner
        self.report.batches += bool(reads)
        for r, value in zip(reads, self._verify(reads) if reads else [], strict=True):
            if value != parse_checksum(r.checksum):
                log.warning("tensor %s changed after it was verified; fetching it again", r.name)
                self.done.discard(r.name)
                self.report.verified.pop(r.name, None)
                self.report.overwritten.append(r.name)
                self.landed -= self.got[r.name]
                self.owner.pop(r.name)
                self.replan.add(r.name)
        return len(names)
