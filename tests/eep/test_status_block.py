"""The supervisor-worker status block: a value written while the other process reads is seen
whole, never as the zeros ``struct.pack_into`` writes first (a fence deadline read as 0 fenced
healthy workers); the suspects bitmap, and the supervisor copying a resync request with its
suspects into the slot record."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from eep.rank.status import StatusBlock, status_path


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


def _block() -> StatusBlock:
    return StatusBlock(f"test-status-{uuid.uuid4().hex[:6]}", 0, create=True)


def test_the_suspects_bitmap_holds_any_of_256_slots_and_a_reset_clears_it():
    block = _block()
    try:
        assert block.get_suspects() == () and block.resync_request() is None
        block.set_suspects([255, 0, 63, 64, 128, 64])
        assert block.get_suspects() == (0, 63, 64, 128, 255)
        for bad in (256, -1):
            with pytest.raises(ValueError, match="bitmap"):
                block.set_suspects([1, bad])
        assert block.get_suspects() == (0, 63, 64, 128, 255)  # a refused set changes nothing
        block.ask_resync(7, [3, 1])
        assert block.resync_request() == (7, (1, 3))
        block.set("kv_free", 11)  # the words before the bitmap are untouched by it
        assert block.get("resync_epoch") == 7 and block.get("kv_free") == 11
        block.reset(incarnation=4)
        assert block.get_suspects() == () and block.resync_request() is None
        assert block.get("incarnation") == 4
    finally:
        block.close(unlink=True)


def test_a_block_of_the_old_64_byte_layout_is_refused_by_a_reader_and_grown_by_its_creator():
    cluster = f"test-status-{uuid.uuid4().hex[:6]}"
    path = status_path(cluster, 0)
    with open(path, "wb") as f:
        f.write(bytes(64))
    try:
        with pytest.raises(ValueError, match="another status layout"):
            StatusBlock(cluster, 0)
        block = StatusBlock(cluster, 0, create=True)
        block.set_suspects([200])
        assert StatusBlock(cluster, 0).get_suspects() == (200,)
        block.close()
    finally:
        os.unlink(path)


def test_the_supervisor_copies_a_resync_request_and_its_suspects_into_the_record(
    etcd, etcd_server, cluster
):
    from eep.membership.keys import Keys
    from eep.membership.registry import SlotRecord, SlotRegistration
    from eep.membership.session import Session
    from eep.rank.supervisor import Supervisor, SupervisorConfig

    keys = Keys(cluster)
    sup = Supervisor(
        SupervisorConfig(etcd=etcd_server.endpoint, cluster=cluster, slot=0, standby=False)
    )
    sup.worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    watch = None
    try:
        with Session(etcd) as session:
            reg = SlotRegistration(etcd, keys, session, 0)
            reg.register()
            watch = threading.Thread(target=sup._watch, args=(reg,), daemon=True)
            watch.start()

            def record() -> SlotRecord:
                return SlotRecord.from_kv(etcd.get(keys.slot(0)), keys)

            sup.status.ask_resync(5, [2, 7])  # what the worker does
            _until(lambda: (record().resync_epoch, record().suspects) == (5, (2, 7)))
            sup.status.ask_resync(6, [])
            _until(lambda: (record().resync_epoch, record().suspects) == (6, ()))
    finally:
        sup.stop.set()
        if watch is not None:
            watch.join(timeout=10)
        sup.worker.kill()
        sup.worker.wait(timeout=10)
        sup.status.close(unlink=True)
        sup.client.close()


def _until(pred, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
