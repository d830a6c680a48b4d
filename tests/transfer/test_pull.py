"""Pulls between real processes: Mooncake over loopback TCP, real etcd, SIGKILL."""

from __future__ import annotations

import signal

import torch

from eep.tools.holder_proc import fill_arena, spec_tensors
from eep.transfer.arena import Arena, ArenaLayout
from eep.transfer.checkpoint import Checkpoint, save_checkpoint
from eep.transfer.executor import Puller
from eep.transfer.manifest import ManifestStore

from .conftest import tcp_config

MiB = 1 << 20


def _original(tensors) -> Arena:
    arena = Arena("experts", ArenaLayout.pack(tensors))
    fill_arena(arena)
    return arena


def _fresh(tensors) -> Arena:
    arena = Arena("experts", ArenaLayout.pack(tensors))
    arena.buffer.fill_(0xA5)  # poison: every byte must be written
    return arena


def test_arena_rebuilt_from_two_sources_is_byte_identical(holders, transport, etcd, cluster):
    tensors = spec_tensors(24, 2 * MiB)
    a, b = holders.start("0", tensors), holders.start("1", tensors)
    holders.wait_ready(a, b)
    arena = _fresh(tensors)
    arena.register(transport)
    try:
        report = Puller(transport, arena, tcp_config()).pull(ManifestStore(etcd, cluster).live())
    finally:
        arena.unregister()
    assert torch.equal(arena.buffer, _original(tensors).buffer)
    assert set(report.bytes_by_holder) == {"0", "1"}  # both sources carried bytes
    assert min(report.bytes_by_holder.values()) > 0.3 * report.nbytes
    assert not report.failed_holders and not report.corrupt


def test_pull_completes_from_other_replica_when_source_is_sigkilled_midway(
    holders, transport, etcd, cluster
):
    tensors = spec_tensors(64, 4 * MiB)  # 256 MiB
    a, b = holders.start("0", tensors), holders.start("1", tensors)
    holders.wait_ready(a, b)
    arena = _fresh(tensors)
    arena.register(transport)
    killed = []

    def progress(done: int, total: int) -> None:
        if not killed and done > 0.1 * total:  # holder 0 still owes most of its half
            a.kill(signal.SIGKILL)
            killed.append(done)

    try:
        report = Puller(transport, arena, tcp_config(), progress).pull(
            ManifestStore(etcd, cluster).live()
        )
    finally:
        arena.unregister()
    assert killed and killed[0] < report.nbytes  # the kill landed mid-pull
    assert "0" in report.failed_holders
    assert report.replans >= 1
    assert torch.equal(arena.buffer, _original(tensors).buffer)


def test_pull_rides_out_a_source_that_hangs_midway_by_its_deadline(
    holders, transport, etcd, cluster
):
    tensors = spec_tensors(32, 2 * MiB)
    a, b = holders.start("0", tensors), holders.start("1", tensors)
    holders.wait_ready(a, b)
    arena = _fresh(tensors)
    arena.register(transport)
    stopped = []

    def progress(done: int, total: int) -> None:
        if not stopped and done > 0:  # first landed request: holder 0 has most of its left
            a.kill(signal.SIGSTOP)  # alive, connected, silent: only a deadline catches it
            stopped.append(done)

    try:
        report = Puller(transport, arena, tcp_config(op_timeout_s=1.0), progress).pull(
            ManifestStore(etcd, cluster).live()
        )
    finally:
        arena.unregister()
    assert stopped
    assert "timed out" in report.failed_holders["0"]
    assert torch.equal(arena.buffer, _original(tensors).buffer)


def test_corrupt_source_is_caught_by_checksum_and_fetched_elsewhere(
    holders, transport, etcd, cluster
):
    tensors = spec_tensors(8, 1 * MiB)
    names = tuple(t[0] for t in tensors)
    a = holders.start("0", tensors, corrupt=names)  # every copy on holder 0 is bad
    b = holders.start("1", tensors)
    holders.wait_ready(a, b)
    arena = _fresh(tensors)
    arena.register(transport)
    try:
        report = Puller(transport, arena, tcp_config()).pull(ManifestStore(etcd, cluster).live())
    finally:
        arena.unregister()
    assert report.corrupt and {h for h, _ in report.corrupt} == {"0"}
    assert torch.equal(arena.buffer, _original(tensors).buffer)


def test_tensor_no_peer_holds_is_read_from_the_checkpoint(
    holders, transport, etcd, cluster, tmp_path
):
    tensors = spec_tensors(6, 1 * MiB)
    save_checkpoint(_original(tensors), tmp_path / "model.safetensors")
    a = holders.start("0", tensors[:4])  # holds only the first four
    holders.wait_ready(a)
    arena = _fresh(tensors)
    arena.register(transport)
    try:
        report = Puller(transport, arena, tcp_config()).pull(
            ManifestStore(etcd, cluster).live(), checkpoint=Checkpoint(tmp_path)
        )
    finally:
        arena.unregister()
    assert sorted(report.from_disk) == sorted(t[0] for t in tensors[4:])
    assert torch.equal(arena.buffer, _original(tensors).buffer)
