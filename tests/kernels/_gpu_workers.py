"""Per-rank bodies of the multi-GPU tests (spawned by ``_mp.run_ranks``; one GPU per rank).

Each returns a JSON-able dict with ``errors`` (mismatches as text), so the parent asserts.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist
from _ep_inputs import make_inputs

from eep.kernels import reference as ref
from eep.kernels.config import EpConfig
from eep.kernels.grouped_gemm import grouped_swiglu
from eep.kernels.routing import route
from eep.kernels.symm_buffer import SymmEpBuffer
from eep.kernels.view import DeviceView

PER_SLOT, TOPK = 4, 4


def _setup(
    rank: int,
    world: int,
    hidden: int,
    max_tokens: int,
    exchange_timeout_s: float = 0.2,
    placement: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device(rank))
    cfg = EpConfig(
        num_slots=world,
        experts_per_slot=PER_SLOT,
        hidden=hidden,
        topk=TOPK,
        max_tokens=max_tokens,
        dtype=torch.bfloat16,
        exchange_timeout_s=exchange_timeout_s,
    )
    experts = world * PER_SLOT
    log2phy, count = placement or (torch.arange(experts)[:, None], torch.ones(experts))
    view = DeviceView.create(torch.ones(world), log2phy, count, epoch=0, device=f"cuda:{rank}")
    buf = SymmEpBuffer(cfg, view)
    _warm_up(buf)
    return cfg, buf


def _warm_up(buf: SymmEpBuffer) -> None:
    """One step at epoch 0 compiles the kernels on every rank (ranks compile at different
    speeds, so this step may time out); the tests then run at epoch >= 1, where the warm-up's
    flags are stale and never match."""
    dev = buf.buf.device
    x = torch.randn(1, buf.cfg.hidden, device=dev).to(buf.cfg.dtype)
    phy = torch.arange(buf.cfg.topk, dtype=torch.int32, device=dev)[None, :]
    w = torch.rand(1, buf.cfg.topk, device=dev)
    recv_x, handle = buf.dispatch(x, phy, w)
    buf.combine(recv_x, handle)
    torch.cuda.synchronize()
    dist.barrier(device_ids=[dev.index])
    buf.view.epoch.fill_(1)
    buf.set_step(0)
    buf.reset_step_status()  # a warm-up timeout must not mark a slot suspect for the tests


def _exchange(buf: SymmEpBuffer, seed: int, tokens: list[int], ranks: list[int], errors: list):
    """One dispatch/combine step checked exactly against the reference (y = recv_x * 2^(d+1))."""
    cfg, me, dev = buf.cfg, buf.rank, buf.buf.device
    world = cfg.num_slots
    dead = frozenset(range(world)) - set(ranks)
    xs, phys, ws = make_inputs(
        seed, tokens, world, cfg.experts_per_slot, cfg.hidden, cfg.topk, cfg.dtype, dead
    )
    # Poison, then start together: a peer ahead of us would store into our buffer before the
    # poison (erasing its rows), or time out on us while we check the previous step on the CPU.
    buf.recv_x.fill_(float("nan"))
    buf.reset_step_status()  # one exchange is one engine step here
    torch.cuda.synchronize()
    _store_barrier(f"step-{seed}", len(ranks))
    recv_x, handle = buf.dispatch(xs[me].to(dev), phys[me].to(dev), ws[me].to(dev))
    y = recv_x * 2.0 ** (me + 1)
    out = torch.full((tokens[me], cfg.hidden), float("nan"), dtype=cfg.dtype, device=dev)
    out = buf.combine(y, handle, out=out)
    torch.cuda.synchronize()
    senders = [r in ranks for r in range(world)]
    want = ref.dispatch_ref(
        xs,
        phys,
        ws,
        experts_per_slot=cfg.experts_per_slot,
        max_tokens=cfg.max_tokens,
        senders=senders,
    )
    w = want[me]
    if not torch.equal(handle.recv_m.cpu(), w.recv_m):
        errors.append(f"seed {seed}: recv_m {handle.recv_m.tolist()} != {w.recv_m.tolist()}")
    for le in range(cfg.experts_per_slot):
        for s in ranks:
            rows = slice(s * cfg.max_tokens, s * cfg.max_tokens + int(w.recv_m[le, s]))
            same = torch.equal(recv_x[le, rows].cpu(), w.recv_x[le, rows])
            same &= torch.equal(handle.recv_src_idx[le, rows].cpu(), w.recv_src_idx[le, rows])
            same &= torch.equal(handle.recv_weights[le, rows].cpu(), w.recv_weights[le, rows])
            if not same:
                errors.append(f"seed {seed}: rows of expert {le} from slot {s} differ")
    ys = [want[d].recv_x * 2.0 ** (d + 1) if senders[d] else None for d in range(world)]
    rows = ref.gather_expert_outputs_ref(ys, want, me, tokens[me], cfg.topk, cfg.max_tokens)
    expect = ref.combine_ref(rows, phys[me], ws[me], torch.tensor(senders), cfg.experts_per_slot)
    if not torch.equal(out.cpu(), expect):
        bad = (out.cpu().float() - expect.float()).abs().max().item()
        errors.append(f"seed {seed}: combine output differs (max abs diff {bad})")
    status, suspect = buf.status.item(), buf.suspect_mask.tolist()
    if status or any(suspect):
        errors.append(f"seed {seed}: status {status}, suspects {suspect}")


def exchange_worker(rank: int, world: int, hidden: int, max_tokens: int, tokens: list[list[int]]):
    """Several steps, each with its own token counts per rank (decode and prefill sizes)."""
    _, buf = _setup(rank, world, hidden, max_tokens)
    errors: list[str] = []
    for step, toks in enumerate(tokens):
        _exchange(buf, 1000 + step, toks, list(range(world)), errors)
    return {"errors": errors, "step": buf.step.item()}


def kill_worker(rank: int, world: int, victim: int, exchange_timeout_s: float):
    """Two clean steps; then ``victim`` SIGKILLs itself; survivors must return within the
    timeout with it flagged, apply the view without it and keep exchanging exactly."""
    cfg, buf = _setup(rank, world, 512, 64, exchange_timeout_s)
    errors: list[str] = []
    everyone = list(range(world))
    for step in range(2):
        _exchange(buf, 2000 + step, [64, 17, 0, 33][:world], everyone, errors)
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    dev = buf.buf.device
    xs, phys, ws = make_inputs(3000, [9] * world, world, PER_SLOT, 512, TOPK, cfg.dtype)
    _store_barrier("straddle", world - 1)
    start = time.monotonic()
    recv_x, handle = buf.dispatch(xs[rank].to(dev), phys[rank].to(dev), ws[rank].to(dev))
    out = buf.combine(recv_x, handle)
    torch.cuda.synchronize()
    straddling_s = time.monotonic() - start
    result = {
        "straddling_s": straddling_s,
        "suspect": buf.suspect_mask.tolist(),
        "status": buf.status.item(),
        "out_shape": list(out.shape),
    }
    survivors = [r for r in everyone if r != victim]
    # the view without the victim is committed only after every survivor left the straddling
    # step (in the runtime: detection -> etcd commit -> applied at a step boundary)
    _store_barrier("straddled", len(survivors))
    mask = torch.ones(world, dtype=torch.int32)
    mask[victim] = 0
    buf.view.update_(mask, buf.view.log2phy.cpu(), buf.view.replica_count.cpu(), 2)
    buf.set_step(0)
    buf.reset_step_status()
    for step in range(3):
        _exchange(buf, 4000 + step, [64, 5, 1, 30][:world], survivors, errors)
    result["errors"] = errors
    return result


def _store_barrier(key: str, count: int, timeout_s: float = 60.0) -> None:
    """Host barrier through the TCP store (no NCCL collective: a peer is dead)."""
    store = dist.distributed_c10d._get_default_store()
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"store barrier {key!r}: fewer than {count} ranks arrived")
        time.sleep(0.002)


def graph_worker(rank: int, world: int):
    """routing + dispatch + grouped GEMM + combine in one CUDA graph; the view is then changed
    in place (a slot masked, replicas reordered and dropped) and the replay follows it."""
    hidden, inter, tokens, experts, reps = 256, 128, 48, 12, 2
    gen = torch.Generator().manual_seed(77)
    w13_log = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2_log = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    # physical expert p hosts logical expert p % experts: replicas of each expert on 2 slots
    phy2log = torch.arange(world * PER_SLOT) % experts
    log2phy = torch.full((experts, reps + 1), -1, dtype=torch.int32)
    count = torch.zeros(experts, dtype=torch.int32)
    for p, e in enumerate(phy2log.tolist()):
        log2phy[e, count[e]] = p
        count[e] += 1
    mask = torch.ones(world, dtype=torch.int32)
    cfg, buf = _setup(rank, world, hidden, tokens, placement=(log2phy, count))
    dev = buf.buf.device
    mine = phy2log[rank * PER_SLOT : (rank + 1) * PER_SLOT]
    w13 = w13_log[mine].to(cfg.dtype).to(dev)
    w2 = w2_log[mine].to(cfg.dtype).to(dev)
    all_logits = [torch.randn(tokens, experts, generator=gen) for _ in range(world)]
    all_x = [torch.randn(tokens, hidden, generator=gen).to(cfg.dtype) for _ in range(world)]
    logits, x = all_logits[rank].to(dev), all_x[rank].to(dev)
    group_m = buf.recv_m.view(-1)  # [L * S]: group l * S + s is expert l's rows from slot s
    y = torch.empty(PER_SLOT * world, tokens, hidden, dtype=cfg.dtype, device=dev)
    out = torch.empty(tokens, hidden, dtype=cfg.dtype, device=dev)

    def step():
        r = route(logits, buf.view, topk=TOPK, experts_per_slot=PER_SLOT, spread_offset=rank)
        recv_x, handle = buf.dispatch(x, r.topk_phy, r.topk_weights)
        grouped_swiglu(
            recv_x.view(PER_SLOT * world, tokens, hidden),
            group_m,
            w13,
            w2,
            groups_per_expert=world,
            out=y,
        )
        buf.combine(y, handle, out=out)
        return r

    route(logits, buf.view, topk=TOPK, experts_per_slot=PER_SLOT, spread_offset=rank)
    grouped_swiglu(
        buf.recv_x.view(-1, tokens, hidden), group_m, w13, w2, groups_per_expert=world, out=y
    )
    torch.cuda.synchronize()
    dist.barrier(device_ids=[rank])
    step()  # warm up (a real exchange)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        routed = step()
    errors: list[str] = []
    results = {}

    def check(tag: str, view_mask, view_log2phy, view_count, ranks):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = ref.route_ref(
            all_logits[rank],
            view_log2phy,
            view_count,
            view_mask,
            topk=TOPK,
            experts_per_slot=PER_SLOT,
            spread_offset=rank,
        )
        if not torch.equal(routed.topk_phy.cpu(), want.topk_phy):
            errors.append(f"{tag}: routing differs from the reference")
        ok = want.topk_phy >= 0
        acc = torch.zeros(tokens, hidden)
        xf = all_x[rank].float()
        for k in range(TOPK):
            e = want.topk_idx[:, k].long()
            gate_up = torch.einsum("th,tnh->tn", xf, w13_log[e].to(cfg.dtype).float())
            h = (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(cfg.dtype)
            y_ref = torch.einsum("ti,thi->th", h.float(), w2_log[e].to(cfg.dtype).float())
            acc += torch.where(ok[:, k, None], want.topk_weights[:, k, None] * y_ref, 0.0)
        got = out.cpu().float()
        err = float((got - acc).norm() / acc.norm())
        results[tag] = {"rel_err": err, "status": buf.status.item(), "dropped": int((~ok).sum())}
        if not err < 2e-2 or buf.status.item() != 0:
            errors.append(f"{tag}: rel err {err:.3g}, status {buf.status.item()}")

    check("view1", mask, log2phy, count, list(range(world)))
    # view 2: slot world-1 leaves; its replicas drop out of log2phy, the rest are reordered
    gone = world - 1
    new_log2phy = torch.full_like(log2phy, -1)
    new_count = torch.zeros_like(count)
    for e in range(experts):
        keep = [int(p) for p in log2phy[e, : count[e]] if int(p) // PER_SLOT != gone][::-1]
        new_log2phy[e, : len(keep)] = torch.tensor(keep, dtype=torch.int32)
        new_count[e] = len(keep)
    new_mask = mask.clone()
    new_mask[gone] = 0
    torch.cuda.synchronize()
    dist.barrier()
    if rank != gone:  # the excluded slot stops taking part
        buf.view.update_(new_mask, new_log2phy, new_count, 2)
        buf.set_step(0)
        buf.reset_step_status()
        check("view2", new_mask, new_log2phy, new_count, [r for r in range(world) if r != gone])
    return {"errors": errors, "results": results}
