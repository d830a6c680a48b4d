"""``eep bench transfer``: GB/s of a recovery-sized pull from 1, 2 and 3 holders.

Holders are real processes (one per source, each on its own GPU when there are enough); this
process pulls their expert arena into its own, verified, and prints each figure beside the
ceiling measured in the same run: a plain torch device-to-device peer copy on GPU, a local
memcpy on CPU. Writes everything to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where arenas live (auto: cuda when a GPU is present)",
    )
    parser.add_argument(
        "--size-mib",
        type=int,
        default=0,
        help="bytes pulled, MiB (default: 8192 on GPU, 512 on CPU)",
    )
    parser.add_argument("--tensors", type=int, default=128, help="tensors in the arena")
    parser.add_argument("--sources", default="1,2,3", help="source counts to measure")
    parser.add_argument(
        "--protocols",
        default="",
        help="comma list (default: tcp on CPU; cuda_ipc,nvlink_intra on GPU). "
        "'nvlink_intra-naive' repeats the first try: no MC_INTRANODE_NVLINK",
    )
    parser.add_argument("--repeats", type=int, default=3, help="pulls per figure (median)")
    parser.add_argument(
        "--chunk-mib", type=int, default=0, help="request size, MiB (default: 256 on GPU, 8 on CPU)"
    )
    parser.add_argument(
        "--inflight", type=int, default=0, help="requests in flight per source (8 GPU, 4 CPU)"
    )
    parser.add_argument(
        "--naive-mib",
        type=int,
        default=2048,
        help="size of the nvlink_intra-naive pull (it is slow)",
    )
    parser.add_argument("--json", default="bench-transfer.json", help="output file")
    parser.add_argument("--etcd", default="", help="etcd host:port (default: start one)")
    parser.add_argument("--progress", action="store_true", help="show progress of each pull")


def _progress_printer(label: str):
    state = {"next": 0.1}

    def show(done: int, total: int) -> None:
        if done >= state["next"] * total:
            print(f"\r  {label}: {100 * done / total:5.1f}%", end="", file=sys.stderr, flush=True)
            state["next"] = done / total + 0.1
            if done >= total:
                print(file=sys.stderr)

    return show


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def _ceiling(device, nbytes: int, repeats: int) -> tuple[float, str]:
    """GB/s of a plain torch copy of ``nbytes``: peer copy cuda:1 -> cuda:0, or CPU memcpy."""
    import torch

    if device.type == "cuda":
        src_dev = 1 if torch.cuda.device_count() > 1 else 0
        src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_dev}").fill_(7)
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        what = f"torch copy_ cuda:{src_dev} -> cuda:0"
    else:
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
        dst = torch.empty(nbytes, dtype=torch.uint8)
        what = "torch copy_ host memcpy"
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return nbytes / statistics.median(times[1:]) / 1e9, what


def _start_holders(ctx, etcd: str, cluster: str, config, tensors, devices):
    from eep.tools.holder_proc import SourceSpec, serve

    procs = []
    for i, dev in enumerate(devices):
        spec = SourceSpec(
            etcd, cluster, str(i + 1), config, tuple(tensors), device=dev, lifetime_s=900.0
        )
        parent, child = ctx.Pipe()
        p = ctx.Process(target=serve, args=(spec, child), daemon=True)
        p.start()
        child.close()
        procs.append((p, parent))
    for p, conn in procs:
        if not conn.poll(180):
            _stop_holders(procs)
            raise RuntimeError(f"holder pid {p.pid} not ready within 180 s")
        try:
            msg = conn.recv()
        except EOFError:
            msg = ("died", p.pid)
        if msg[0] != "ready":
            _stop_holders(procs)
            raise RuntimeError(f"holder pid {p.pid} did not start ({msg}); see its stderr")
    return procs


def _stop_holders(procs) -> None:
    for _, conn in procs:
        try:
            conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
    for p, _ in procs:
        p.join(15)
        if p.is_alive():
            p.kill()
            p.join(5)


def _bench_protocol(args, proto: str, device, total_mib: int, source_counts, etcd, ctx):
    import torch

    from eep.tools.holder_proc import spec_tensors
    from eep.transfer.arena import Arena, ArenaLayout
    from eep.transfer.config import TransferConfig
    from eep.transfer.engine import start_transport
    from eep.transfer.executor import Puller
    from eep.transfer.manifest import ManifestStore

    naive = proto.endswith("-naive")
    protocol = proto.removesuffix("-naive")
    gpu = device.type == "cuda"
    cfg = TransferConfig(
        protocol=protocol,
        host_id="bench",
        chunk_nbytes=(args.chunk_mib or (256 if gpu else 8)) * MiB,
        max_inflight=args.inflight or (8 if gpu else 4),
        engine_env=(("MC_INTRANODE_NVLINK", ""),) if naive else (),
        op_timeout_s=10.0,
        min_bytes_per_s=2e8,
        pull_timeout_s=90.0,
    )
    tensors = spec_tensors(args.tensors, total_mib * MiB // args.tensors)
    n_src = max(source_counts)
    ngpu = torch.cuda.device_count() if gpu else 0
    if gpu:
        devices = [f"cuda:{1 + i % (ngpu - 1)}" if ngpu > 1 else "cuda:0" for i in range(n_src)]
    else:
        devices = ["cpu"] * n_src
    cluster = f"bench{os.getpid()}{protocol.replace('_', '')}{'n' if naive else ''}"
    print(f"[{proto}] starting {n_src} holders on {devices} ...", file=sys.stderr, flush=True)
    procs = _start_holders(ctx, etcd.endpoint, cluster, cfg, tensors, devices)
    rows = []
    try:
        transport = start_transport(cfg)
        arena = Arena("experts", ArenaLayout.pack(tensors), device)
        arena.register(transport)
        manifests = ManifestStore(etcd, cluster).live()
        for k in source_counts:
            use = [m for m in manifests if int(m.holder) <= k]
            # the first pull opens IPC mappings, handshakes and compiles the checksum kernel:
            # what a restarted rank pays once; reported apart, not in the median
            cold = Puller(transport, arena, cfg).pull(use).seconds
            times, report = [], None
            for r in range(args.repeats):
                arena.buffer.fill_(0)
                _sync(device)
                prog = _progress_printer(f"{proto} x{k} #{r}") if args.progress else None
                report = Puller(transport, arena, cfg, prog).pull(use)
                _sync(device)
                times.append(report.seconds)
            med = statistics.median(times)
            rows.append(
                {
                    "protocol": proto,
                    "sources": k,
                    "nbytes": report.nbytes,
                    "seconds": med,
                    "gbps": report.nbytes / med / 1e9,
                    "all_seconds": times,
                    "cold_seconds": cold,
                    "bytes_by_holder": report.bytes_by_holder,
                    "failed_holders": report.failed_holders,
                }
            )
            print(
                f"[{proto}] {k} source(s): {rows[-1]['gbps']:.2f} GB/s (first pull {cold:.3f} s)",
                file=sys.stderr,
            )
        arena.unregister()
        transport.close()
    finally:
        _stop_holders(procs)
    return rows


def run(args: argparse.Namespace) -> int:
    import multiprocessing as mp

    import torch

    from eep.membership.etcd import EtcdClient
    from eep.membership.server import EtcdServer

    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda:0" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(0)
    total_mib = args.size_mib or (8192 if use_gpu else 512)
    default = "cuda_ipc,nvlink_intra" if use_gpu else "tcp"
    protocols = [p for p in (args.protocols or default).split(",") if p]
    source_counts = [int(s) for s in args.sources.split(",")]
    server = None if args.etcd else EtcdServer().start()
    etcd = EtcdClient(args.etcd or server.endpoint)
    etcd.endpoint = args.etcd or server.endpoint
    ctx = mp.get_context("spawn")
    card = torch.cuda.get_device_name(0) if use_gpu else "cpu"
    ceiling, ceiling_what = _ceiling(device, total_mib * MiB, args.repeats)
    print(f"ceiling ({ceiling_what}, {total_mib} MiB): {ceiling:.2f} GB/s", file=sys.stderr)
    result = {
        "card": card,
        "device_count": torch.cuda.device_count() if use_gpu else 0,
        "torch": torch.__version__,
        "ceiling_gbps": ceiling,
        "ceiling": ceiling_what,
        "size_mib": total_mib,
        "tensors": args.tensors,
        "results": [],
        "errors": {},
    }
    try:
        for proto in protocols:
            naive = proto.endswith("-naive")
            size = min(total_mib, args.naive_mib) if naive else total_mib
            counts = [1] if naive else source_counts
            try:
                rows = _bench_protocol(args, proto, device, size, counts, etcd, ctx)
            except Exception as exc:  # one protocol failing must not lose the others' figures
                print(f"[{proto}] failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                result["errors"][proto] = f"{type(exc).__name__}: {exc}"
                rows = []
            for r in rows:
                r["ratio_to_ceiling"] = r["gbps"] / ceiling
            result["results"] += rows
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        etcd.close()
        if server is not None:
            server.cleanup()
    print(
        f"\ntransfer bench on {card}: pull of {total_mib} MiB in {args.tensors} tensors, "
        f"verified; ceiling {ceiling:.1f} GB/s ({ceiling_what})"
    )
    print(f"{'protocol':<20}{'sources':>8}{'MiB':>8}{'s':>9}{'GB/s':>9}{'/ceiling':>10}")
    for r in result["results"]:
        print(
            f"{r['protocol']:<20}{r['sources']:>8}{r['nbytes'] // MiB:>8}{r['seconds']:>9.4f}"
            f"{r['gbps']:>9.2f}{r['ratio_to_ceiling']:>9.1%}"
        )
    for proto, err in result["errors"].items():
        print(f"{proto:<20} failed: {err}")
    print(f"JSON: {args.json}")
    return 1 if result["errors"] else 0
