"""``eep bench transfer``: GB/s of a recovery-sized pull from 1, 2 and 3 holders.

Holders are real processes (one per source, each on its own GPU when there are enough); this
process pulls from them and prints each figure beside the ceiling measured in the same run (a
torch peer copy on GPU, a memcpy on CPU). Three pulls of the same size, interleaved each round:
``bench``, :class:`eep.transfer.executor.Puller` over 128 tensors, verified (the figure this
bench always printed); ``raw``, the same bytes in the same requests with no planning and no
checksums; ``recovery``, what a restarted rank runs: ``ExpertArena.fill`` with the rank's
transfer config into the expert arena of a Qwen3-MoE model whose experts have
``--recovery-shape`` (Qwen3-30B-A3B's: 3 MiB tensors), held by every holder in the same order
(as a replica of the initial placement). Writes everything to a JSON file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

from .recovery_report import provenance

MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arg = parser.add_argument
    arg("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if present")
    arg("--size-mib", type=int, default=0, help="bytes pulled, MiB (8192 on GPU, 512 on CPU)")
    arg("--tensors", type=int, default=128, help="tensors in the arena")
    arg("--sources", default="1,2,3", help="source counts to measure")
    arg(
        "--protocols",
        default="",
        help="comma list (default: tcp on CPU; cuda_ipc,nvlink_intra on GPU). "
        "'nvlink_intra-naive' repeats the first try: no MC_INTRANODE_NVLINK",
    )
    arg("--repeats", type=int, default=3, help="pulls per figure (median)")
    arg("--chunk-mib", type=int, default=0, help="request size, MiB (256 on GPU, 8 on CPU)")
    arg("--inflight", type=int, default=0, help="requests in flight per source (8 GPU, 4 CPU)")
    arg("--naive-mib", type=int, default=2048, help="size of the nvlink_intra-naive pull (slow)")
    arg("--recovery-shape", default="2048,768", help="recovery experts' hidden,moe_intermediate")
    arg("--no-recovery", action="store_true", help="skip the recovery and raw pulls")
    arg("--json", default="bench-transfer.json", help="output file")
    arg("--etcd", default="", help="etcd host:port (default: start one)")
    arg("--progress", action="store_true", help="show progress of each pull")


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


def _recovery_model(args, total_nbytes: int, device):
    """A Qwen3-MoE model on ``device`` whose experts (``--recovery-shape``, bf16) fill about
    ``total_nbytes``; dense parts shrunk to almost nothing (only the experts are pulled)."""
    import torch

    from eep.model.config import ModelConfig
    from eep.model.qwen3_moe import Qwen3MoeModel

    hidden, inter = (int(v) for v in args.recovery_shape.split(","))
    full = ModelConfig.qwen3_30b_a3b()
    experts = max(1, total_nbytes // (3 * hidden * inter * 2))
    layers = max(1, -(-experts // full.num_experts))
    small = dict(vocab_size=256, num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    shape = dict(hidden_size=hidden, moe_intermediate_size=inter, num_hidden_layers=layers)
    cfg = full.replace(intermediate_size=64, **small, **shape)
    local = tuple(range(max(1, experts // layers)))
    return Qwen3MoeModel(cfg, local, device=device, dtype=torch.bfloat16)


def _raw_pull(transport, arena, manifests, cfg) -> float:
    """Seconds to move ``arena``'s bytes from ``manifests``' holders (an equal contiguous share
    each, at the same offsets) in requests of ``chunk_nbytes``, ``max_inflight`` per holder:
    the executor's requests without its planning and checksums."""
    from eep.transfer.engine import Op, Poll

    share, step = -(-arena.nbytes // len(manifests)), cfg.chunk_nbytes
    queues, flying = [], [[] for _ in manifests]
    for i, m in enumerate(manifests):
        stop = min(arena.nbytes, (i + 1) * share)
        todo = [(o, min(step, stop - o)) for o in range(i * share, stop, step)]
        queues.append((m.peer, m.region("experts").addr, todo))
    t0, idle = time.monotonic(), 0
    while any(q for _, _, q in queues) or any(flying):
        moved = 0
        for (peer, base, q), fly in zip(queues, flying, strict=True):
            while q and len(fly) < cfg.max_inflight:
                off, n = q.pop(0)
                fly.append(transport.submit(Op.READ, peer, arena.addr + off, base + off, n))
                moved += 1
            for t in list(fly):
                state = transport.poll(t)
                if state is Poll.FAILED:
                    raise RuntimeError(f"raw read from holder {peer.holder} failed")
                if state is Poll.DONE:
                    fly.remove(t)
                    moved += 1
        idle = 0 if moved else min(idle + 1, 6)  # the executor's back-off
        if idle:
            time.sleep(min(25e-6 * (1 << idle), 2e-3))
    _sync(arena.device)
    return time.monotonic() - t0


def _bench_protocol(args, proto: str, device, total_mib: int, source_counts, etcd, ctx):
    import torch

    from eep.expert_arena import ExpertArena
    from eep.tools.holder_proc import spec_tensors
    from eep.transfer.arena import Arena, ArenaLayout
    from eep.transfer.config import TransferConfig
    from eep.transfer.engine import start_transport
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
    experts = None
    if not args.no_recovery:
        experts = ExpertArena(_recovery_model(args, total_mib * MiB, device), device)
        specs = experts.arena.layout.specs
        tensors = (*tensors, *((s.name, s.dtype, s.shape) for s in specs))
        print(f"[{proto}] recovery: {len(specs)} tensors of {specs[0].nbytes} B", file=sys.stderr)
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
        arena = Arena("experts", ArenaLayout.pack(tensors[: args.tensors]), device)
        arena.register(transport)
        store = ManifestStore(etcd, cluster)
        manifests = store.live()
        # what a restarted rank builds (eep/rank/build.py): the protocol's defaults
        rank_cfg = TransferConfig(protocol=protocol, host_id=cfg.host_id, engine_env=cfg.engine_env)
        if experts is not None:
            experts.arena.register(transport)
        for k in source_counts:
            use = [m for m in manifests if int(m.holder) <= k]
            pulls = {
                "bench": (arena, functools.partial(_verified, args, transport, arena, cfg, use))
            }
            if experts is not None:
                others = tuple(m.holder for m in manifests if int(m.holder) > k)
                pulls["raw"] = (arena, functools.partial(_raw, transport, arena, use, cfg))
                pulls["recovery"] = (
                    experts.arena,
                    functools.partial(_recovery, transport, experts, store, rank_cfg, others),
                )
            rows.append(_measure(args, proto, k, pulls))
        for a in (arena, *([experts.arena] if experts else [])):
            a.unregister()
        transport.close()
    finally:
        _stop_holders(procs)
    return rows


def _verified(args, transport, arena, cfg, use, label: str):
    from eep.transfer.executor import Puller

    prog = _progress_printer(label) if args.progress else None
    report = Puller(transport, arena, cfg, prog).pull(use)
    extra = {"bytes_by_holder": report.bytes_by_holder, "failed_holders": report.failed_holders}
    return report.seconds, report.nbytes, extra


def _raw(transport, arena, use, cfg, label: str):
    return _raw_pull(transport, arena, use, cfg), arena.nbytes, {}


def _recovery(transport, experts, store, rank_cfg, others, label: str):
    stats = experts.fill(transport, store, rank_cfg, None, exclude=others)
    return stats.seconds, stats.nbytes, {"bytes_by_holder": stats.from_peers}


def _measure(args, proto: str, k: int, pulls) -> dict:
    """Every pull once cold (handshakes, IPC mappings, kernel compiles: what a restarted rank
    pays once; reported apart), then ``args.repeats`` rounds of all of them, interleaved so a
    shared machine's load falls on each alike. Figures are medians; ``*_paired`` is the median
    of the ratios within each round."""
    times: dict[str, list[float]] = {name: [] for name in pulls}
    cold, last = {}, {}
    for r in range(-1, args.repeats):
        for name, (arena, pull) in pulls.items():
            arena.buffer.fill_(0)
            _sync(arena.device)
            seconds, nbytes, extra = pull(f"{proto} x{k} {name} #{r}")
            if r < 0:
                cold[name] = seconds
            else:
                times[name].append(seconds)
            last[name] = (nbytes, extra)
    row = {"protocol": proto, "sources": k}
    for name, (nbytes, extra) in last.items():
        pre, med = ("" if name == "bench" else f"{name}_"), statistics.median(times[name])
        row |= {f"{pre}nbytes": nbytes, f"{pre}seconds": med, f"{pre}gbps": nbytes / med / 1e9}
        row |= {f"{pre}all_seconds": times[name], f"{pre}cold_seconds": cold[name]}
        row |= {f"{pre}{key}": value for key, value in extra.items()}
    line = f"[{proto}] {k} source(s): bench {row['gbps']:.2f} GB/s"
    if "recovery" in pulls:
        row["recovery_over_bench"] = row["recovery_gbps"] / row["gbps"]
        row["recovery_over_raw"] = row["recovery_gbps"] / row["raw_gbps"]
        row["bench_over_raw"] = row["gbps"] / row["raw_gbps"]
        rounds = zip(times["recovery"], times["bench"], strict=True)
        ratios = [(row["recovery_nbytes"] / t) / (row["nbytes"] / b) for t, b in rounds]
        row["recovery_over_bench_paired"] = statistics.median(ratios)
        line += f", raw {row['raw_gbps']:.2f}, recovery {row['recovery_gbps']:.2f}"
    print(line + f"; first pull {cold['bench']:.3f} s", file=sys.stderr)
    return row


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
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "provenance": provenance(),  # the commit, dirty paths, machine
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
        "load_avg_start": os.getloadavg(),
        "recovery_shape": None if args.no_recovery else args.recovery_shape,
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
            result["load_avg_end"] = os.getloadavg()
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        etcd.close()
        if server is not None:
            server.cleanup()
    _print_table(args, result, total_mib)
    return 1 if result["errors"] else 0


def _print_table(args, result: dict, total_mib: int) -> None:
    load = (result["load_avg_start"][0], result.get("load_avg_end", [0])[0])
    print(
        f"\ntransfer bench on {result['card']}, {result['date']}: pull of {total_mib} MiB in "
        f"{args.tensors} tensors, verified; ceiling {result['ceiling_gbps']:.1f} GB/s "
        f"({result['ceiling']}); load average {load[0]:.1f} at the start, {load[1]:.1f} at the end"
    )
    head = f"{'protocol':<20}{'sources':>8}{'MiB':>6}{'s':>8}{'GB/s':>8}{'/ceiling':>9}"
    print(head + (f"{'raw':>8}{'recovery':>10}{'rec/bench':>10}" if not args.no_recovery else ""))
    for r in result["results"]:
        rec = "{raw_gbps:>8.2f}{recovery_gbps:>10.2f}{recovery_over_bench:>10.2f}"
        print(
            f"{r['protocol']:<20}{r['sources']:>8}{r['nbytes'] // MiB:>6}{r['seconds']:>8.3f}"
            f"{r['gbps']:>8.2f}{r['ratio_to_ceiling']:>9.1%}"
            + (rec.format(**r) if "recovery_gbps" in r else "")
        )
    if not args.no_recovery:
        print(f"recovery: ExpertArena.fill, experts {args.recovery_shape} (hidden,moe_inter), the")
        print("rank's transfer config; raw: the bench's requests without planning or checksums")
    for proto, err in result["errors"].items():
        print(f"{proto:<20} failed: {err}")
    print(f"JSON: {args.json}")
