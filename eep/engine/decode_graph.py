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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import BatchAttention
from .sequence import Scheduled

MIN_CONTEXT = 64


def _pow2_at_least(n: int, floor: int = 1) -> int:
    n = max(n, floor)
    return 1 << (n - 1).bit_length()


@dataclass
class _Bucket:
    rows: int
    context: int
    ids: torch.Tensor  # [rows] int64
    positions: torch.Tensor  # [rows] int64
    table: torch.Tensor  # [rows, context // block_size] int64 block ids
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output, [rows, vocab]


class DecodeRunner:
    """Runs an engine's decode steps (see the module docstring). ``capture``: record CUDA
    graphs (default: on a CUDA device when the MoE executor is ``graph_safe``)."""

    def __init__(self, engine, capture: bool | None = None):
        self.engine = engine
        self.block_size = engine.kv.cfg.block_size
        self.max_rows = engine.scheduler.budget
        if capture is None:
            capture = engine.device.type == "cuda" and engine.moe.graph_safe
        self.capture = capture
        self.scratch = engine.kv.reserve_scratch()
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = None  # one memory pool shared by every graph (replayed one at a time)
        self.captured = 0

    def fits(self, batch: list[Scheduled]) -> bool:
        return bool(batch) and all(s.count == 1 and s.samples for s in batch)

    def step(self, batch: list[Scheduled], end_step: Callable[[], None]) -> torch.Tensor:
        """One decode step: the logits of ``batch``'s rows ``[len(batch), vocab]``;
        ``end_step`` runs after the layers (it raises for a failed step)."""
        bucket = self._bucket(batch)
        self._fill(bucket, batch)
        if bucket.graph is not None:
            bucket.graph.replay()
            end_step()
            return bucket.logits[: len(batch)]
        with torch.inference_mode():
            logits = self._forward(bucket)
        end_step()
        if self.capture:
            self._capture(bucket)
        return logits[: len(batch)]

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
        torch.cuda.synchronize(self.engine.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the runtime's other threads (etcd, transfers) may touch CUDA meanwhile
        with (
            torch.inference_mode(),
            torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"),
        ):
            bucket.logits = self._forward(bucket)
        self.pool = graph.pool()
        bucket.graph = graph
        self.captured += 1
