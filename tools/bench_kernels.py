"""``eep bench kernels``: EP kernel speed, measured side by side in one run.

1. dispatch + combine (symm fabric, CUDA graph) against ``all_to_all_single`` (NCCL) doing the
   same exchange (split sizes exchanged, then one row per (token, k) there and back, weighted
   sum), for 1-256 tokens per rank and several hidden sizes, top-k 8, one process per GPU;
2. the same kernels with the elastic checks off (mask, epoch, timeout): the checks' cost;
3. grouped SwiGLU GEMM against a per-expert ``torch.matmul`` loop and the dense bf16 matmul
   rate of the same card.

Prints ratio tables and writes everything to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

from eep.config import default_exchange_timeout_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=4, help="ranks, one GPU each (default 4)")
    parser.add_argument(
        "--tokens", default="1,8,32,64,128,256", help="tokens per rank, comma-separated"
    )
    parser.add_argument("--hidden", default="2048,4096,7168", help="hidden sizes")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts-per-slot", type=int, default=16)
    parser.add_argument("--iters", type=int, default=200, help="timed iterations per point")
    parser.add_argument(
        "--exchange-timeout",
        dest="exchange_timeout_s",
        type=float,
        default=default_exchange_timeout_s("cuda"),
        metavar="S",
        help="bounded wait on a peer per exchange, in seconds (default: a cluster's on cuda)",
    )
    parser.add_argument("--skip-comm", action="store_true", help="only the GEMM benchmark")
    parser.add_argument("--skip-gemm", action="store_true", help="only dispatch/combine")
    parser.add_argument("--out", default="kernels-bench.json", help="JSON results path")


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
        print(f"eep bench kernels needs {args.gpus} CUDA GPUs; found {torch.cuda.device_count()}.")
        return 2
    report: dict = {"card": torch.cuda.get_device_name(0), "gpus": args.gpus}
    if not args.skip_comm:
        report["comm"] = _run_comm(args)
        _print_comm(report["comm"])
    if not args.skip_gemm:
        report["gemm"] = _bench_gemm()
        _print_gemm(report["gemm"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


# -- dispatch / combine ---------------------------------------------------------------------


def _run_comm(args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outdir = tempfile.mkdtemp(prefix="eep-bench-")
    conf = {
        "tokens": [int(t) for t in args.tokens.split(",")],
        "hidden": [int(h) for h in args.hidden.split(",")],
        "topk": args.topk,
        "experts_per_slot": args.experts_per_slot,
        "iters": args.iters,
        "exchange_timeout_s": args.exchange_timeout_s,
    }
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_comm_worker, args=(r, args.gpus, port, outdir, conf))
        for r in range(args.gpus)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 900
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    with open(os.path.join(outdir, "rank0.json")) as f:
        return json.load(f)


def _comm_worker(rank: int, world: int, port: int, outdir: str, conf: dict) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device(rank))
    rows = []
    for hidden in conf["hidden"]:
        rows += _bench_hidden(rank, world, hidden, conf)
    if rank == 0:
        with open(os.path.join(outdir, "rank0.json"), "w") as f:
            json.dump(rows, f)
    dist.barrier(device_ids=[rank])
    dist.destroy_process_group()


_ROUNDS = 7  # alternating checks-on / checks-off rounds per point; medians are reported
_KEEP_ALIVE: list = []  # symmetric buffers live until the process exits (no collective frees)


def _bench_hidden(rank: int, world: int, hidden: int, conf: dict) -> list[dict]:
    import torch
    import torch.distributed as dist

    from eep.kernels.config import EpConfig
    from eep.kernels.symm_buffer import SymmEpBuffer
    from eep.kernels.view import DeviceView

    per_slot, topk, cap = conf["experts_per_slot"], conf["topk"], max(conf["tokens"])
    num_phy = world * per_slot
    view = DeviceView.create(
        torch.ones(world), torch.arange(num_phy)[:, None], torch.ones(num_phy), 1, f"cuda:{rank}"
    )
    bufs = {}
    for elastic in (True, False):
        cfg = EpConfig(
            world, per_slot, hidden, topk, cap, torch.bfloat16, conf["exchange_timeout_s"],
            elastic=elastic,
        )  # fmt: skip
        bufs[elastic] = SymmEpBuffer(cfg, view)
        _KEEP_ALIVE.append(bufs[elastic])
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(rank)
    for tokens in conf["tokens"]:
        x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
        keys = torch.rand(tokens, num_phy, device="cuda", generator=gen)
        phy = keys.argsort(dim=1)[:, :topk].to(torch.int32).contiguous()
        w = torch.rand(tokens, topk, device="cuda", generator=gen)
        times = {}
        graphs = {e: _capture(bufs[e], x, phy, w) for e in (True, False)}
        # alternate on/off rounds so clock and thermal drift hit both alike
        on, off = [], []
        for _ in range(_ROUNDS):
            on.append(_time_graph(graphs[True], conf["iters"]))
            off.append(_time_graph(graphs[False], conf["iters"]))
        times["symm_us"] = sorted(on)[_ROUNDS // 2]
        times["symm_checks_off_us"] = sorted(off)[_ROUNDS // 2]
        times["symm_eager_us"] = _time_eager(bufs[True], x, phy, w, max(20, conf["iters"] // 4))
        times["nccl_us"] = _time_nccl(x, phy, w, world, per_slot, max(20, conf["iters"] // 4))
        for buf in bufs.values():
            if buf.status.item() != 0:
                raise RuntimeError(f"rank {rank}: a benchmark step failed (status {buf.status})")
        t = torch.tensor([times[k] for k in sorted(times)], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        row = dict(zip(sorted(times), t.tolist(), strict=True))
        row.update(hidden=hidden, tokens=tokens, topk=topk)
        row["speedup_vs_nccl"] = row["nccl_us"] / row["symm_us"]
        row["checks_overhead"] = row["symm_us"] / row["symm_checks_off_us"] - 1.0
        rows.append(row)
    return rows


def _capture(buf, x, phy, w):
    import torch

    def step():
        recv_x, handle = buf.dispatch(x, phy, w)
        return buf.combine(recv_x, handle)

    step()  # compile, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _time_graph(graph, iters: int) -> float:
    for _ in range(10):
        graph.replay()
    return _median_us([graph.replay] * iters)


def _time_eager(buf, x, phy, w, iters: int) -> float:
    def step():
        recv_x, handle = buf.dispatch(x, phy, w)
        buf.combine(recv_x, handle)

    for _ in range(5):
        step()
    return _median_us([step] * iters)


def _median_us(fns) -> float:
    import torch

    events = []
    for fn in fns:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1000.0 for s, e in events)
    return times[len(times) // 2]


def _time_nccl(x, phy, w, world: int, per_slot: int, iters: int) -> float:
    """What a fixed-membership NCCL EP layer does for the same exchange: one row per (t, k)."""
    import torch
    import torch.distributed as dist

    tokens, topk = phy.shape
    hidden = x.shape[1]

    def step():
        flat = phy.reshape(-1).long()
        dst = torch.where(flat >= 0, flat // per_slot, world)
        order = torch.argsort(dst, stable=True)
        send_counts = torch.bincount(dst, minlength=world + 1)[:world]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        counts = torch.cat([send_counts, recv_counts]).tolist()  # the host sync NCCL needs
        send_split, recv_split = counts[:world], counts[world:]
        n_send = sum(send_split)
        order = order[:n_send]
        send_x = x[order // topk]
        send_meta = flat[order].to(torch.int32)
        recv_x = x.new_empty(sum(recv_split), hidden)
        recv_meta = send_meta.new_empty(sum(recv_split))
        dist.all_to_all_single(recv_meta, send_meta, recv_split, send_split)
        dist.all_to_all_single(recv_x, send_x, recv_split, send_split)
        back = torch.empty_like(send_x)
        dist.all_to_all_single(back, recv_x, send_split, recv_split)  # expert output = input
        rows = x.new_zeros(tokens * topk, hidden)
        rows[order] = back
        out = (rows.view(tokens, topk, hidden).float() * w[..., None]).sum(1)
        return out.to(x.dtype)

    for _ in range(5):
        step()
    return _median_us([step] * iters)


def _print_comm(rows: list[dict]) -> None:
    print("\ndispatch + combine, us per step (max over ranks; symm = CUDA graph replay)")
    head = f"{'hidden':>6} {'tok':>4} {'symm':>8} {'chk off':>8} {'eager':>8} {'nccl':>8}"
    print(head + f" {'x nccl':>7} {'checks':>7}")
    for r in rows:
        print(
            f"{r['hidden']:>6} {r['tokens']:>4} {r['symm_us']:>8.1f} "
            f"{r['symm_checks_off_us']:>8.1f} {r['symm_eager_us']:>8.1f} {r['nccl_us']:>8.1f} "
            f"{r['speedup_vs_nccl']:>6.2f}x {100 * r['checks_overhead']:>6.2f}%"
        )


# -- grouped GEMM ---------------------------------------------------------------------------

_GEMM_SHAPES = [  # (hidden, intermediate, local experts, rows per expert)
    (2048, 768, 8, 4096),
    (4096, 1536, 8, 2048),
    (7168, 2048, 8, 2048),
    (7168, 2048, 8, 4096),
    (7168, 2048, 16, 64),
]


def _bench_gemm() -> list[dict]:
    import torch

    torch.cuda.set_device(0)
    return [_bench_gemm_shape(*shape) for shape in _GEMM_SHAPES]


def _bench_gemm_shape(hidden: int, inter: int, experts: int, m: int) -> dict:
    import torch
    import torch.nn.functional as F
    import triton.testing

    from eep.kernels.grouped_gemm import grouped_swiglu

    x = torch.randn(experts, m, hidden, device="cuda").bfloat16()
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda") / inter**0.5).bfloat16()
    group_m = torch.full((experts,), m, dtype=torch.int32, device="cuda")
    h = torch.empty(experts, m, inter, dtype=x.dtype, device="cuda")
    out = torch.empty_like(x)

    def ours():
        grouped_swiglu(x, group_m, w13, w2, h=h, out=out)

    def loop():
        for e in range(experts):
            gu = x[e] @ w13[e].T
            torch.matmul(F.silu(gu[:, :inter]) * gu[:, inter:], w2[e].T)

    xd = x.view(experts * m, hidden)
    w13d, w2d = w13[0].T.contiguous(), w2[0].T.contiguous()
    hd = torch.randn(experts * m, inter, device="cuda").bfloat16()

    def dense():  # the same FLOPs as one dense pair of matmuls: the card's bf16 rate
        torch.matmul(xd, w13d)
        torch.matmul(hd, w2d)

    flops = 2 * experts * m * hidden * 3 * inter
    t = {
        name: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        for name, fn in (("ours", ours), ("loop", loop), ("dense", dense))
    }
    return dict(
        hidden=hidden,
        inter=inter,
        experts=experts,
        rows_per_expert=m,
        ours_ms=t["ours"],
        loop_ms=t["loop"],
        dense_ms=t["dense"],
        ours_tflops=flops / t["ours"] / 1e9,
        dense_tflops=flops / t["dense"] / 1e9,
        vs_loop=t["loop"] / t["ours"],
        vs_dense=t["dense"] / t["ours"],
    )


def _print_gemm(rows: list[dict]) -> None:
    print("\ngrouped SwiGLU GEMM (bf16, fp32 accumulate)")
    print(
        f"{'H':>5} {'I':>5} {'E':>3} {'rows/E':>6} {'ours ms':>8} {'TFLOP/s':>8} "
        f"{'dense TF':>8} {'of dense':>8} {'x loop':>7}"
    )
    for r in rows:
        print(
            f"{r['hidden']:>5} {r['inter']:>5} {r['experts']:>3} {r['rows_per_expert']:>6} "
            f"{r['ours_ms']:>8.3f} {r['ours_tflops']:>8.1f} {r['dense_tflops']:>8.1f} "
            f"{100 * r['vs_dense']:>7.1f}% {r['vs_loop']:>6.2f}x"
        )
