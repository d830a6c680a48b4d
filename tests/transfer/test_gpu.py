"""GPU-to-GPU pulls between real processes on one host (the lent GPU machine)."""

from __future__ import annotations

import signal

import pytest
import torch

from eep.tools.holder_proc import fill_arena, spec_tensors
from eep.transfer.arena import Arena, ArenaLayout
from eep.transfer.config import TransferConfig
from eep.transfer.engine import start_transport
from eep.transfer.executor import Puller
from eep.transfer.manifest import ManifestStore

MiB = 1 << 20


def _need_gpus(n: int) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPUs on one host")


@pytest.mark.multigpu
@pytest.mark.parametrize("protocol", ["cuda_ipc", "nvlink_intra"])
def test_gpu_arena_rebuilt_from_two_gpu_holders_is_byte_identical(protocol, holders, etcd, cluster):
    _need_gpus(3)
    torch.cuda.set_device(0)
    cfg = TransferConfig(protocol=protocol, host_id="gpuhost", chunk_nbytes=64 * MiB)
    tensors = spec_tensors(32, 16 * MiB)  # 512 MiB
    a = holders.start("1", tensors, device="cuda:1", config=cfg)
    b = holders.start("2", tensors, device="cuda:2", config=cfg)
    holders.wait_ready(a, b)
    transport = start_transport(cfg)
    arena = Arena("experts", ArenaLayout.pack(tensors), "cuda:0")
    arena.buffer.fill_(0xA5)
    arena.register(transport)
    report = Puller(transport, arena, cfg).pull(ManifestStore(etcd, cluster).live())
    torch.cuda.synchronize()
    original = Arena("experts", ArenaLayout.pack(tensors), "cuda:0")
    fill_arena(original)
    assert torch.equal(arena.buffer, original.buffer)
    assert set(report.bytes_by_holder) == {"1", "2"}
    arena.unregister()
    transport.close()


@pytest.mark.multigpu
def test_gpu_pull_survives_a_holder_killed_before_its_reads(holders, etcd, cluster):
    _need_gpus(3)
    torch.cuda.set_device(0)
    cfg = TransferConfig(
        protocol="nvlink_intra", host_id="gpuhost", chunk_nbytes=16 * MiB, connect_timeout_s=2.0
    )
    tensors = spec_tensors(16, 8 * MiB)
    a = holders.start("1", tensors, device="cuda:1", config=cfg)
    b = holders.start("2", tensors, device="cuda:2", config=cfg)
    holders.wait_ready(a, b)
    manifests = ManifestStore(etcd, cluster).live()
    a.kill(signal.SIGKILL)
    a.proc.join(10)
    transport = start_transport(cfg)
    arena = Arena("experts", ArenaLayout.pack(tensors), "cuda:0")
    arena.register(transport)
    report = Puller(transport, arena, cfg).pull(manifests)
    original = Arena("experts", ArenaLayout.pack(tensors), "cuda:0")
    fill_arena(original)
    assert "1" in report.failed_holders
    assert torch.equal(arena.buffer, original.buffer)
    arena.unregister()
    transport.close()


@pytest.mark.gpu
def test_gpu_pull_verifies_in_batches_and_fetches_a_corrupt_tensor_again_alone(
    holders, etcd, cluster
):
    """Two holder processes on one GPU, cuda_ipc: one Triton launch and one host read per batch;
    the rotten tensor inside a batch comes again from the other holder, alone."""
    _need_gpus(1)
    torch.cuda.set_device(0)
    cfg = TransferConfig(protocol="cuda_ipc", host_id="gpuhost", verify_workers=1)
    tensors = spec_tensors(2048, 256 << 10)  # 512 MiB in 256 KiB tensors
    bad = tensors[100][0]  # inside holder 1's first run
    a = holders.start("1", tensors, device="cuda:0", config=cfg, corrupt=(bad,))
    b = holders.start("2", tensors, device="cuda:0", config=cfg)
    holders.wait_ready(a, b)
    transport = start_transport(cfg)
    arena = Arena("experts", ArenaLayout.pack(tensors), "cuda:0")
    arena.buffer.fill_(0xA5)
    arena.register(transport)
    report = Puller(transport, arena, cfg).pull(ManifestStore(etcd, cluster).live())
    original = Arena("experts", ArenaLayout.pack(tensors), "cuda:0")
    fill_arena(original)
    assert torch.equal(arena.buffer, original.buffer)
    assert report.corrupt == [("1", bad)]
    assert report.batches < len(tensors) // 16  # batched, not one computation per tensor
    arena.unregister()
    transport.close()
