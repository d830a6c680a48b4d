"""The supervisor-worker status block: a value written while the other process reads is seen
whole, never as the zeros ``struct.pack_into`` writes first (a fence deadline read as 0 fenced
healthy workers)."""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid

from eep.rank.status import StatusBlock


def _write_deadlines(cluster: str, stop, started) -> None:
    block = StatusBlock(cluster, 0)
    started.set()
    value = 1000.0
    while not stop.is_set():
        for _ in range(1000):
            value += 0.001
            block.set("fence_deadline", value)
    block.close()


def test_a_deadline_rewritten_in_a_loop_is_never_read_as_zero():
    cluster = f"test-status-{uuid.uuid4().hex[:6]}"
    block = StatusBlock(cluster, 0, create=True)
    block.set("fence_deadline", 999.0)
    ctx = mp.get_context("spawn")
    stop, started = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_write_deadlines, args=(cluster, stop, started))
    writer.start()
    try:
        assert started.wait(60), "the writer process did not start"
        reads, low = 0, float("inf")
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            for _ in range(1000):
                low = min(low, block.get("fence_deadline"))
            reads += 1000
        assert low >= 999.0, f"read {low} among {reads} reads of values >= 999"
    finally:
        stop.set()
        writer.join(timeout=30)
        block.close(unlink=True)
