"""Decode steps on static buffers, padded to buckets, replayed from CUDA graphs.

A decode step (every scheduled request computes one position and samples) is the hot loop of
serving. Launched from Python it costs a few milliseconds of launches per layer, and in an EP
instance every exchange waits for the slowest rank's launches. :class:`DecodeRunner` runs
such steps over tensors allocated once per bucket ``(rows, context)``: ``rows`` the batch
padded to a power of two (at most the step budget), ``context`` the longest context padded
to a power of two (at least 64). The first step of a bucket runs eagerly on those tensors
(it compiles every kernel and takes part in the step's exchanges like any other step); on a
GPU, with an MoE executor that never syncs the host (``graph_safe``), the bucket is then
captured once and every later step copies its inputs in and replays the graph.

The graph stays valid across views: the kernels read the view (mask, replicas, epoch, peer
buffer addresses) from device tensors that a new view updates in place. A step whose
exchanges failed is discarded after the replay (``end_step`` raises) and simply replayed again
under the next view; its KV writes are overwritten.

Padding: rows past the batch decode token 0 at position 0 into a KV block reserved for them
(``KVCache.reserve_scratch``) and attend to that one position; their outputs are dropped.
Every decode step of an engine with a runner goes through the padded path, replayed or not,
so results do not depend on whether a bucket was captured yet.

The cap (``RuntimeConfig.max_cuda_graphs``): at most ``max_graphs`` buckets hold a graph
(:class:`GraphCache`). Capturing one more first evicts the least recently replayed: its graph
is reset and the whole bucket dropped (static inputs, graph output), so its next step starts
a fresh bucket, eager. A bucket evicted ``k`` times is captured again only after ``2**k``
eager steps (at most ``MAX_RECAPTURE_WAIT``): a working set larger than the cap settles into
capturing now and then, not on every step. The bookkeeping is a dict move per step (no device
work, no host sync); eviction happens only at a capture, which syncs anyway.

Memory: every graph is captured into one allocator pool (``self.pool``), since buckets are
replayed one at a time and never read each other's outputs: sharing a pool among graphs that
never run concurrently is safe in any replay order (pytorch/pytorch#166975), and what a
capture freed (its intermediates) the next capture reuses, which keeps many graphs cheap.
Evicting from a shared pool returns nothing to the device: ``CUDAGraph.reset`` calls the
allocator's ``releasePool``, which only decrements the pool's use count; its blocks can be
``cudaFree``'d only once the count reaches 0 (and then only by ``empty_cache`` or an OOM retry).
What eviction does free is the evicted graph's live blocks (its output logits) into the pool,
where the next capture reuses them, plus the graph executable and the bucket's static inputs:
the cap bounds the pool's growth, it does not shrink it. The pool must keep one live graph:
capturing into a pool whose use count fell to 0 trips the allocator's ``use_count > 0``
assert, so with a cap of 1 the old graph goes just after the new one is captured, not before.
:meth:`DecodeRunner.graph_memory` measures it (:class:`GraphMemory`): the segments of the shared
pool in the allocator's snapshot (``torch.cuda.memory_snapshot``, ``segment_pool_id``), their
total size (what the pool reserves) and what is allocated in them (what the held graphs keep).
Deltas of ``memory_allocated`` around each capture were tried first and are wrong: a previous
step's output, freed while a capture runs, makes them negative (seen on an H100). Where the
snapshot has no pool id (or no pool exists yet), the deltas are what is reported.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass

import torch

from eep.config import DEFAULT_MAX_CUDA_GRAPHS

from .attention import BatchAttention
from .sequence import Scheduled

log = logging.getLogger(__name__)

MIN_CONTEXT = 64
MAX_RECAPTURE_WAIT = 256  # eager steps an often-evicted bucket waits, at most, to be captured


def _pow2_at_least(n: int, floor: int = 1) -> int:
    n = max(n, floor)
    return 1 << (n - 1).bit_length()


class GraphCache:
    """Which buckets hold a captured graph: at most ``cap``, least recently replayed first,
    and when a bucket running eagerly is (re)captured. Pure bookkeeping of hashable keys (no
    torch, no device): every method is O(1)."""

    def __init__(self, cap: int):
        if not cap >= 1:
            raise ValueError(f"GraphCache cap must be >= 1, got {cap!r}.")
        self.cap = cap
        self.evictions = 0
        self._lru: OrderedDict[Hashable, None] = OrderedDict()  # least recently replayed first
        self._evicted: dict[Hashable, int] = {}  # times each key was evicted (one per bucket)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru

    def keys(self) -> list[Hashable]:
        """The captured keys, least recently replayed first."""
        return list(self._lru)

    def touch(self, key: Hashable) -> None:
        """``key``'s graph was replayed: it becomes the most recent."""
        self._lru.move_to_end(key)

    def wait(self, key: Hashable) -> int:
        """Eager steps ``key`` runs before it is captured: 1, or ``2**k`` (at most
        ``MAX_RECAPTURE_WAIT``) once it was evicted ``k`` times."""
        return min(1 << min(self._evicted.get(key, 0), 30), MAX_RECAPTURE_WAIT)

    def wants(self, key: Hashable, eager_steps: int) -> bool:
        """Capture ``key`` now, after its ``eager_steps``-th eager step?"""
        return key not in self._lru and eager_steps >= self.wait(key)

    def victim(self) -> Hashable | None:
        """The key to evict before one more is captured: the least recently replayed, where
        the cache is full; else None."""
        return next(iter(self._lru)) if len(self._lru) >= self.cap else None

    def add(self, key: Hashable) -> None:
        if key in self._lru or len(self._lru) >= self.cap:
            raise ValueError(f"GraphCache: cannot add {key!r} ({len(self)}/{self.cap} held).")
        self._lru[key] = None

    def evict(self, key: Hashable) -> None:
        del self._lru[key]
        self._evicted[key] = self._evicted.get(key, 0) + 1
        self.evictions += 1


@dataclass(frozen=True, slots=True)
class GraphMemory:
    """What a runner's CUDA graphs hold (:meth:`DecodeRunner.graph_memory`)."""

    graphs: int  # captured now
    cap: int  # at most this many
    captures: int  # captures ever (re-captures of an evicted bucket count again)
    evictions: int
    # the growth of torch.cuda.memory_reserved over every capture: the shared pool, which
    # keeps its blocks while any graph shares it (an eviction returns none of it)
    reserved_bytes: int
    # torch.cuda.memory_allocated that the graphs captured now still hold (their outputs)
    allocated_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Bucket:
    rows: int
    context: int
    ids: torch.Tensor  # [rows] int64
    positions: torch.Tensor  # [rows] int64
    table: torch.Tensor  # [rows, context // block_size] int64 block ids
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output, [rows, vocab]
    eager_steps: int = 0  # steps run eagerly since the bucket was made
    graph_bytes: int = 0  # memory_allocated the capture kept (the graph's output)

    @property
    def key(self) -> tuple[int, int]:
        return self.rows, self.context


class DecodeRunner:
    """Runs an engine's decode steps (see the module docstring). ``capture``: record CUDA
    graphs (default: on a CUDA device when the MoE executor is ``graph_safe``);
    ``max_graphs``: how many buckets hold one at once."""

    def __init__(
        self, engine, capture: bool | None = None, max_graphs: int = DEFAULT_MAX_CUDA_GRAPHS
    ):
        self.engine = engine
        self.block_size = engine.kv.cfg.block_size
        self.max_rows = engine.scheduler.budget
        if capture is None:
            capture = engine.device.type == "cuda" and engine.moe.graph_safe
        self.capture = capture
        self.scratch = engine.kv.reserve_scratch()
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.graphs = GraphCache(max_graphs)
        self.pool = None  # one memory pool shared by every graph (replayed one at a time)
        self.captured = 0  # captures ever
        self._reserved = 0  # memory_reserved growth over every capture, bytes
        self._allocated = 0  # memory_allocated the graphs held now keep, bytes

    def fits(self, batch: list[Scheduled]) -> bool:
        return bool(batch) and all(s.count == 1 and s.samples for s in batch)

    def step(self, batch: list[Scheduled], end_step: Callable[[], None]) -> torch.Tensor:
        """One decode step: the logits of ``batch``'s rows ``[len(batch), vocab]``;
        ``end_step`` runs after the layers (it raises for a failed step)."""
        bucket = self._bucket(batch)
        self._fill(bucket, batch)
        if bucket.graph is not None:
            self.graphs.touch(bucket.key)
            bucket.graph.replay()
            end_step()
            return bucket.logits[: len(batch)]
        with torch.inference_mode():
            logits = self._forward(bucket)
        end_step()
        bucket.eager_steps += 1
        if self.capture and self.graphs.wants(bucket.key, bucket.eager_steps):
            self._capture(bucket)
        return logits[: len(batch)]

    def graph_memory(self) -> GraphMemory:
        """The graphs held now and the memory of their pool (the module docstring)."""
        pool = self._pool_bytes()
        reserved, allocated = pool if pool is not None else (self._reserved, self._allocated)
        return GraphMemory(
            graphs=len(self.graphs),
            cap=self.graphs.cap,
            captures=self.captured,
            evictions=self.graphs.evictions,
            reserved_bytes=reserved,
            allocated_bytes=allocated,
        )

    def _pool_bytes(self) -> tuple[int, int] | None:
        """``(reserved, allocated)`` bytes of the shared pool's segments, from the allocator's
        snapshot; ``None`` without a pool or where the snapshot names no pools."""
        if self.pool is None or not torch.cuda.is_available():
            return None
        reserved = allocated = 0
        for seg in torch.cuda.memory_snapshot():
            pool_id = seg.get("segment_pool_id")
            if pool_id is None:
                return None
            if tuple(pool_id) == tuple(self.pool):
                reserved += seg["total_size"]
                allocated += seg["allocated_size"]
        return reserved, allocated

    # --- buckets ---------------------------------------------------------------------------

    def _bucket(self, batch: list[Scheduled]) -> _Bucket:
        rows = min(_pow2_at_least(len(batch)), self.max_rows)
        context = _pow2_at_least(max(s.start + 1 for s in batch), MIN_CONTEXT)
        context = -(-context // self.block_size) * self.block_size
        key = (rows, context)
        bucket = self.buckets.get(key)
        if bucket is None:
            dev = self.engine.device
            long = dict(dtype=torch.long, device=dev)
            bucket = _Bucket(
                rows,
                context,
                torch.zeros(rows, **long),
                torch.zeros(rows, **long),
                torch.full((rows, context // self.block_size), self.scratch, **long),
            )
            self.buckets[key] = bucket
        return bucket

    def _fill(self, bucket: _Bucket, batch: list[Scheduled]) -> None:
        """The step's inputs, built on the host and copied into the bucket's tensors."""
        width = bucket.table.shape[1]
        ids = torch.zeros(bucket.rows, dtype=torch.long)
        positions = torch.zeros(bucket.rows, dtype=torch.long)
        table = torch.full((bucket.rows, width), self.scratch, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i] = s.seq.tokens[s.start]
            positions[i] = s.start
            blocks = s.seq.table.blocks[:width]
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        bucket.ids.copy_(ids)
        bucket.positions.copy_(positions)
        bucket.table.copy_(table)

    # --- the step ----------------------------------------------------------------------------

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        """Every op reads the bucket's tensors only (no host data): what the graph records."""
        e = self.engine
        plan = BatchAttention.decode(bucket.table, bucket.positions, self.block_size)
        h = e.layers(e.model.embed(bucket.ids), bucket.positions, plan)
        return e.model.final(h)

    def _capture(self, bucket: _Bucket) -> None:
        self._settle()  # no replay in flight: an evicted graph's blocks are free to reuse
        victim = self.graphs.victim()
        if victim is not None and len(self.graphs) > 1:
            self._evict(victim)  # first, so that this capture reuses its output's blocks
            victim = None
        reserved, allocated = self._memory()
        bucket.graph, bucket.logits = self._record(bucket)
        now_reserved, now_allocated = self._memory()
        bucket.graph_bytes = now_allocated - allocated
        self._reserved += now_reserved - reserved
        self._allocated += bucket.graph_bytes
        self.captured += 1
        if victim is not None:  # the pool's only other graph: it goes once this one holds it
            self._evict(victim)
        self.graphs.add(bucket.key)
        log.info("decode graph %s captured: %s", bucket.key, self.graph_memory().as_dict())

    def _settle(self) -> None:
        torch.cuda.synchronize(self.engine.device)

    def _memory(self) -> tuple[int, int]:
        """The allocator's reserved and allocated bytes on the engine's device."""
        dev = self.engine.device
        return torch.cuda.memory_reserved(dev), torch.cuda.memory_allocated(dev)

    def _record(self, bucket: _Bucket) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture ``bucket``'s forward into the shared pool: the graph and its output."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the runtime's other threads (etcd, transfers) may touch CUDA meanwhile
        with (
            torch.inference_mode(),
            torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"),
        ):
            logits = self._forward(bucket)
        self.pool = graph.pool()
        return graph, logits

    def _evict(self, key: tuple[int, int]) -> None:
        """Drop ``key``'s graph and its whole bucket; its next step makes a fresh one."""
        bucket = self.buckets.pop(key)
        bucket.graph.reset()
        bucket.graph = bucket.logits = None
        self._allocated -= bucket.graph_bytes
        self.graphs.evict(key)
        log.info("decode graph %s evicted: %s", key, self.graph_memory().as_dict())
