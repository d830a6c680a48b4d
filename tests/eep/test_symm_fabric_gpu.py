"""The symm fabric adapter on 2 GPUs: the engine's interface over the Triton kernels gives the
shm fabric's results exactly, with checks on and off (run on the lent GPU machine; skipped
elsewhere). Not yet run: written on a CPU-only machine."""

from __future__ import annotations

import dataclasses
import os
import queue
import socket

import pytest
import torch

from . import _shm_workers as w

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLD, ROUNDS = 2, 4
CFG2 = dataclasses.replace(w.CFG, num_slots=WORLD)


def _free_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def symm_worker(slot: int, addr: str, results) -> None:
    """Both modes, every round checked against the CPU reference; reports mismatches."""
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    torch.cuda.set_device(slot)
    from eep.fabrics.factory import make_fabric

    members = tuple(range(WORLD))
    errors = []
    for elastic in (True, False):
        fabric = make_fabric(
            "symm", "gpu", slot, 1, CFG2, store_addr=addr, device=f"cuda:{slot}", elastic=elastic
        )
        fabric.warm_up()
        fabric.apply_view(1, {s: 1 for s in members})
        for r in range(ROUNDS):
            x, phy, wts = w.inputs(slot, r, members)
            recv, handle = fabric.dispatch(x.cuda(), phy.cuda(), wts.cuda())
            phy_of_row = slot * CFG2.experts_per_slot + recv.local_expert + 1
            y = recv.x * phy_of_row.to(recv.x.dtype).unsqueeze(-1) - 0.5
            got = fabric.combine(y, handle).cpu()
            if not torch.equal(got, w.reference(slot, r, members)):
                errors.append(f"elastic={elastic} round {r}: combine differs")
        torch.cuda.synchronize()
        torch.distributed.barrier(device_ids=[slot])
        fabric.close()
    results.put((slot, errors))


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(NUM_GPUS < WORLD, reason=f"needs {WORLD} CUDA GPUs, found {NUM_GPUS}")
def test_symm_fabric_equals_the_reference_with_checks_on_and_off():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results, addr = ctx.Queue(), _free_addr()
    procs = [ctx.Process(target=symm_worker, args=(s, addr, results)) for s in range(WORLD)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(WORLD):
            slot, errors = results.get(timeout=240)
            out[slot] = errors
    except queue.Empty:
        pytest.fail(f"ranks did not report within 240 s: got {sorted(out)}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert out == {s: [] for s in range(WORLD)}
