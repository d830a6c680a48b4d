"""The symm fabric on 2 GPUs (run on the lent GPU machine; skipped elsewhere):

- the engine's interface over the Triton kernels gives the shm fabric's results exactly, with
  checks on and off;
- a peer SIGKILLed mid-run: the survivor's step fails at its end (one bounded wait), a new
  process for the slot (incarnation 2) maps in with no collective, and the exchanges are exact
  again;
- ``run_moe`` (grouped GEMM on the receive buffer) equals the experts run on one GPU through
  ``run_experts``: the same rows, the same kernel, bit for bit.

Peers find each other's exported buffers in a directory (the runtime uses etcd).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import time
from pathlib import Path

import pytest
import torch

from . import _shm_workers as w

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLD, ROUNDS = 2, 4
CFG2 = dataclasses.replace(w.CFG, num_slots=WORLD)
needs_gpus = pytest.mark.skipif(NUM_GPUS < WORLD, reason=f"needs {WORLD} GPUs, found {NUM_GPUS}")


def _file_barrier(root: str, name: str, who: str, count: int, timeout_s: float = 120.0) -> None:
    Path(root, f"barrier-{name}-{who}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(Path(root).glob(f"barrier-{name}-*"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}")
        time.sleep(0.01)


def _fabric(root, tag, slot, incarnation, elastic=True, cfg=CFG2):
    from eep.fabrics.base import FabricMember, peer_info_from_dir, publish_to_dir
    from eep.fabrics.factory import make_fabric

    torch.cuda.set_device(slot)
    member = FabricMember(
        tag, slot, incarnation, device=f"cuda:{slot}", elastic=elastic,
        peer_info=peer_info_from_dir(root, tag),
    )  # fmt: skip
    fabric = make_fabric("symm", cfg, member)
    fabric.warm_up()
    publish_to_dir(root, tag, slot, incarnation, fabric.export())
    return fabric


def _round(fabric, slot: int, r: int, members: tuple[int, ...]) -> str | None:
    x, phy, wts = w.inputs(slot, r, members)
    recv, handle = fabric.dispatch(x.cuda(), phy.cuda(), wts.cuda())
    phy_of_row = slot * CFG2.experts_per_slot + recv.local_expert + 1
    y = recv.x * phy_of_row.to(recv.x.dtype).unsqueeze(-1) - 0.5
    got = fabric.combine(y, handle).cpu()
    fabric.end_step()
    if not torch.equal(got, w.reference(slot, r, members)):
        return f"round {r}: combine differs"
    return None


def modes_worker(slot: int, root: str, results) -> None:
    members = tuple(range(WORLD))
    errors = []
    for elastic in (True, False):
        tag = f"modes{int(elastic)}"
        fabric = _fabric(root, tag, slot, 1, elastic)
        _file_barrier(root, f"{tag}-up", str(slot), WORLD)
        fabric.apply_view(1, {s: 1 for s in members})
        for r in range(ROUNDS):
            if err := _round(fabric, slot, r, members):
                errors.append(f"elastic={elastic} {err}")
        torch.cuda.synchronize()
        _file_barrier(root, f"{tag}-done", str(slot), WORLD)
        fabric.close()
    results.put((slot, errors))


@pytest.mark.gpu
@pytest.mark.multigpu
@needs_gpus
def test_symm_fabric_equals_the_reference_with_checks_on_and_off(tmp_path):
    out = _run({s: (modes_worker, (s, str(tmp_path))) for s in range(WORLD)})
    assert out == {s: [] for s in range(WORLD)}


def rejoin_worker(slot: int, incarnation: int, root: str, results) -> None:
    """Slot 0 survives; slot 1 incarnation 1 dies after two rounds; incarnation 2 rejoins."""
    members = tuple(range(WORLD))
    report: dict = {"errors": []}
    fabric = _fabric(root, "rejoin", slot, incarnation)
    if incarnation == 1:
        _file_barrier(root, "up", str(slot), WORLD)
        fabric.apply_view(1, {0: 1, 1: 1})
        for r in range(2):
            if err := _round(fabric, slot, r, members):
                report["errors"].append(err)
        if slot == 1:
            torch.cuda.synchronize()
            os.kill(os.getpid(), signal.SIGKILL)
        # slot 0: the peer is gone mid-run; the step fails at its end, after one bounded wait
        from eep.fabrics.base import ExchangeFailed

        started = time.monotonic()
        try:
            _round(fabric, slot, 2, members)
            report["errors"].append("the step with a dead peer did not fail")
        except ExchangeFailed as exc:
            report["failed"] = [exc.reason.value, list(exc.suspects)]
        report["failed_after_s"] = time.monotonic() - started
        Path(root, "survivor-failed").touch()
    _file_barrier(root, "view2", f"{slot}.{incarnation}", WORLD)
    fabric.apply_view(2, {0: 1, 1: 2})
    for r in range(3, 3 + ROUNDS):
        if err := _round(fabric, slot, r, members):
            report["errors"].append(f"after rejoin: {err}")
    torch.cuda.synchronize()
    _file_barrier(root, "done", f"{slot}.{incarnation}", WORLD)
    fabric.close()
    results.put((f"{slot}.{incarnation}", report))


@pytest.mark.gpu
@pytest.mark.multigpu
@needs_gpus
def test_a_killed_peer_fails_the_step_once_and_its_restart_maps_back_in(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    root = str(tmp_path)
    first = [ctx.Process(target=rejoin_worker, args=(s, 1, root, results)) for s in range(WORLD)]
    for p in first:
        p.start()
    deadline = time.monotonic() + 240
    while not Path(root, "survivor-failed").exists():
        assert time.monotonic() < deadline, "the survivor never saw its step fail"
        time.sleep(0.05)
    first[1].join(timeout=30)
    assert first[1].exitcode == -signal.SIGKILL
    second = ctx.Process(target=rejoin_worker, args=(1, 2, root, results))
    second.start()
    out = _collect(results, 2, [first[0], second])
    assert out["0.1"]["errors"] == [] and out["1.2"]["errors"] == []
    assert out["0.1"]["failed"] == ["timeout", [1]]
    assert (
        out["0.1"]["failed_after_s"] < CFG2.exchange_timeout_s + 5.0
    )  # one wait, not one per exchange


def moe_worker(slot: int, root: str, results) -> None:
    from eep.engine.moe_exec import run_experts
    from eep.kernels.experts import weighted_sum
    from eep.model.moe import MoEBlock, SoftmaxTopKRouter

    torch.cuda.set_device(slot)
    cfg = dataclasses.replace(CFG2, hidden=256, experts_per_slot=4, topk=2, max_tokens=64)
    num_experts, inter = cfg.num_slots * cfg.experts_per_slot, 128
    gen = torch.Generator().manual_seed(7)
    w13 = torch.randn(num_experts, 2 * inter, cfg.hidden, generator=gen) / cfg.hidden**0.5
    w2 = torch.randn(num_experts, cfg.hidden, inter, generator=gen) / inter**0.5

    def block(local: list[int]) -> MoEBlock:
        router = SoftmaxTopKRouter(cfg.hidden, num_experts, cfg.topk, True, device="cuda")
        moe = MoEBlock(router, cfg.hidden, inter, num_experts, local, device="cuda")
        moe.w_gate_up.copy_(w13[local])
        moe.w_down.copy_(w2[local])
        return moe

    eps = cfg.experts_per_slot
    mine = block(list(range(slot * eps, (slot + 1) * eps)))
    full = block(list(range(num_experts)))
    fabric = _fabric(root, "moe", slot, 1, cfg=cfg)
    _file_barrier(root, "moe-up", str(slot), WORLD)
    fabric.apply_view(1, {s: 1 for s in range(WORLD)})
    errors = []
    for r in range(3):
        g = torch.Generator().manual_seed(100 * r + slot)
        tokens = [64, 1, 17][r]
        x = torch.randn(tokens, cfg.hidden, generator=g).cuda()
        ids = torch.randint(0, num_experts, (tokens, cfg.topk), generator=g).cuda()
        wts = torch.rand(tokens, cfg.topk, generator=g).cuda()
        got = fabric.run_moe(mine, x, ids.to(torch.int32), wts)
        fabric.end_step()
        rows = torch.arange(tokens, device="cuda").repeat_interleave(cfg.topk)
        want = weighted_sum(run_experts(full, x[rows], ids.view(-1)), wts)
        if not torch.equal(got, want):
            errors.append(f"round {r}: max diff {(got - want).abs().max().item():.3g}")
    torch.cuda.synchronize()
    _file_barrier(root, "moe-done", str(slot), WORLD)
    fabric.close()
    results.put((slot, errors))


@pytest.mark.gpu
@pytest.mark.multigpu
@needs_gpus
def test_run_moe_equals_the_experts_run_on_one_gpu_bit_for_bit(tmp_path):
    out = _run({s: (moe_worker, (s, str(tmp_path))) for s in range(WORLD)})
    assert out == {s: [] for s in range(WORLD)}


def _run(targets: dict) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args, results)) for fn, args in targets.values()]
    for p in procs:
        p.start()
    return _collect(results, len(procs), procs)


def _collect(results, count: int, procs) -> dict:
    """``count`` reports; fails at once when every worker has exited without reporting."""
    out, deadline = {}, time.monotonic() + 240
    try:
        while len(out) < count:
            try:
                key, value = results.get(timeout=1.0)
                out[key] = value
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    pytest.fail(f"workers exited without reporting: got {sorted(out)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"workers did not report within 240 s: got {sorted(out)}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out
