"""The executor: runs a transfer plan, verifies every tensor, re-plans around failures.

One thread submits and polls; a small pool verifies checksums (and reads the checkpoint) as
tensors complete, so verification overlaps the transfer. Each holder has up to
``max_inflight`` requests of at most ``chunk_nbytes`` in flight; a request past its deadline
marks its holder hung. A holder that fails (dead, unreachable, hung) is excluded and every
tensor it had not delivered is re-planned onto the others; a tensor whose bytes fail the
checksum is re-planned with that (holder, tensor) pair excluded.

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

from .arena import ALIGN, Arena, TensorSpec
from .checkpoint import Checkpoint
from .checksum import checksum
from .config import TransferConfig
from .engine import Op, Poll, Ticket
from .errors import NoSource, PullTimeout, SourceFailed
from .manifest import Manifest
from .planner import DiskOp, ReadOp, TransferPlan, plan_pull

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
OnPlan = Callable[[TransferPlan], None]


@dataclass
class PullReport:
    """What a pull did: bytes and seconds, per-holder bytes, and every failure handled."""

    nbytes: int = 0
    seconds: float = 0.0
    bytes_by_holder: dict[str, int] = field(default_factory=dict)
    failed_holders: dict[str, str] = field(default_factory=dict)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    from_disk: list[str] = field(default_factory=list)
    replans: int = 0

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(slots=True)
class _Chunk:
    """One request: ``nbytes`` contiguous on both sides, covering ``parts`` (read, bytes):
    a piece of one large tensor, or several small tensors that lie back to back."""

    local_offset: int
    remote_addr: int
    nbytes: int
    parts: list[tuple[ReadOp, int]]


def _chunks(reads: list[ReadOp], step: int) -> list[_Chunk]:
    """Requests of at most ``step`` bytes; neighbours on both sides (gaps under ``ALIGN``
    equal on both sides, which are padding) are coalesced, so an arena moves in a few large
    requests instead of one per tensor."""
    out: list[_Chunk] = []
    for r in sorted(reads, key=lambda r: r.local_offset):
        if out and r.nbytes <= step:
            c = out[-1]
            gap = r.local_offset - (c.local_offset + c.nbytes)
            if (
                0 <= gap < ALIGN
                and r.remote_addr - (c.remote_addr + c.nbytes) == gap
                and c.nbytes + gap + r.nbytes <= step
            ):
                c.nbytes += gap + r.nbytes
                c.parts.append((r, r.nbytes))
                continue
        for s in range(0, r.nbytes, step):
            n = min(step, r.nbytes - s)
            out.append(_Chunk(r.local_offset + s, r.remote_addr + s, n, [(r, n)]))
    return out


@dataclass(slots=True)
class _InFlight:
    chunk: _Chunk
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
        self.queues: dict[str, deque[_Chunk]] = {}
        self.inflight: dict[str, list[_InFlight]] = {}
        self.owner: dict[str, ReadOp] = {}  # tensor -> the read now responsible for it
        self.left: dict[str, int] = {}  # tensor -> chunks not yet landed
        self.got: dict[str, int] = {}  # tensor -> bytes landed from its current read
        self.verifying: dict[str, Future] = {}
        self.disk_jobs: dict[str, Future] = {}
        # (tensor, future) pairs the pool finished, appended by done callbacks: the loop reads
        # only these, never scans every pending future (with thousands of tensors that scan
        # held the GIL and starved the verifying threads: 1.5 GB/s for 2048 tensors on GPU)
        self.finished: deque[tuple[str, Future]] = deque()
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
        for holder, reads in plan.by_holder().items():
            for r in reads:
                self.owner[r.name] = r
                self.left[r.name] = 0
                self.got[r.name] = 0
                self.report.bytes_by_holder[holder] = (
                    self.report.bytes_by_holder.get(holder, 0) + r.nbytes
                )
            chunks = _chunks(reads, step)
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
                moved = self._submit() + self._poll() + self._collect()
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

    def _landed(self, c: _Chunk) -> None:
        for r, nbytes in c.parts:
            name = r.name
            if self.owner.get(name) is not r:
                continue  # a late chunk of a read that was re-planned
            self.landed += nbytes
            self.got[name] += nbytes
            self.left[name] -= 1
            if self.left[name] == 0:
                self.verifying[name] = self._watch(name, self.pool.submit(self._verify, r))
        if self.p.progress:
            self.p.progress(self.landed, self.report.nbytes)

    def _verify(self, r: ReadOp) -> str:
        return checksum(self.p.arena.bytes_of(self.specs[r.name]))

    def _load_disk(self, d: DiskOp) -> None:
        self.checkpoint.load_into(self.p.arena, self.specs[d.name])

    def _watch(self, name: str, fut: Future) -> Future:
        fut.add_done_callback(lambda f: self.finished.append((name, f)))  # deque: thread-safe
        return fut

    def _collect(self) -> int:
        n = 0
        while self.finished:
            name, fut = self.finished.popleft()
            if self.verifying.get(name) is fut:
                del self.verifying[name]
                self._checked(name, fut.result())
            elif self.disk_jobs.get(name) is fut:
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

    def _checked(self, name: str, actual: str) -> None:
        r = self.owner[name]
        if actual == r.checksum:
            self.done.add(name)
            return
        log.warning(
            "tensor %s from holder %s: checksum %s, manifest says %s; fetching it elsewhere",
            name,
            r.holder,
            actual,
            r.checksum,
        )
        self.report.corrupt.append((r.holder, name))
        self.landed -= self.got[name]
        self.owner.pop(name)
        self.replan.add(name)

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
        """Verify again the tensors an abandoned request might still have written over."""
        names, self.tainted = sorted(self.tainted), set()
        for name in names:
            r = self.owner.get(name)
            if r is not None and self._verify(r) != r.checksum:
                self.done.discard(name)
                self.report.corrupt.append((r.holder, name))
                self.owner.pop(name)
                self.replan.add(name)
        return len(names)
