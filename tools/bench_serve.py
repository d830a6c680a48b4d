"""``eep bench serve``: decode tokens/s of one model and load under each fabric, in one run.

``--slots`` worker processes each build the model with their local experts (as a rank's
worker does), an ``Engine`` with ``FabricMoE`` over every fabric compared, and serve the same
batch of requests (``--batch`` per rank, greedy) under each fabric in turn, round after round
(each round starting with the next fabric), so drift hits all fabrics alike. No HTTP, no
etcd: the view (all slots, the initial placement) is built in place. Compared: on CPU
``shm`` (elastic), ``shm`` with checks off and ``nccl`` (gloo); on GPU ``symm``, ``symm``
with checks off and ``nccl``. Every fabric must produce the same tokens; the bench says
whether they did.

Prints decode tokens/s (all ranks together; median over ``--rounds``) with ratios side by side,
and writes everything to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import tempfile
import time
import uuid

from .common import add_cuda_graphs_argument, cuda_graphs

# (name, fabric kind, elastic) per device type; the first is the one ratios are against
_CPU_FABRICS = (("shm", "shm", True), ("shm-checks-off", "shm", False), ("nccl-gloo", "nccl", True))
_GPU_FABRICS = (("symm", "symm", True), ("symm-checks-off", "symm", False), ("nccl", "nccl", True))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="a checkpoint directory (HF layout)")
    src.add_argument(
        "--config",
        choices=("tiny", "qwen3-30b-a3b"),
        default="tiny",
        help="random weights of this shape in a temp dir (default tiny)",
    )
    parser.add_argument("--layers", type=int, help="with --config: this many layers")
    parser.add_argument("--slots", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--experts-per-slot", type=int, help="default: experts / slots")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="cpu fp32, cuda bf16")
    parser.add_argument("--batch", type=int, default=4, help="requests per rank (default 4)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per fabric")
    parser.add_argument("--max-tokens-per-step", type=int, default=64)
    parser.add_argument(
        "--exchange-timeout",
        "--timeout-s",
        dest="exchange_timeout_s",
        type=float,
        default=30.0,
        metavar="S",
        help="bounded wait on a peer per exchange, in seconds (default 30)",
    )
    add_cuda_graphs_argument(parser)
    parser.add_argument("--out", default="serve-bench.json", help="JSON results path")


def run(args: argparse.Namespace) -> int:
    import torch

    args.cuda_graphs = cuda_graphs(args)  # resolved, so the JSON says what ran

    if args.device == "cuda" and torch.cuda.device_count() < args.slots:
        print(f"--device cuda needs {args.slots} GPUs; found {torch.cuda.device_count()}.")
        return 2
    with tempfile.TemporaryDirectory(prefix="eep-bench-serve-") as tmp:
        model_dir = args.model or _random_checkpoint(args, tmp)
        per_rank = _spawn(args, model_dir, tmp)
    if per_rank is None:
        return 1
    report = _summarise(args, per_rank)
    _print(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0 if report["same_tokens"] else 1


def _random_checkpoint(args: argparse.Namespace, tmp: str) -> str:
    import torch

    from eep.model import ModelConfig, write_random_checkpoint

    cfg = ModelConfig.tiny() if args.config == "tiny" else ModelConfig.qwen3_30b_a3b()
    if args.layers:
        dense = tuple(i for i in cfg.mlp_only_layers if i < args.layers)
        cfg = cfg.replace(num_hidden_layers=args.layers, mlp_only_layers=dense)
    dtype = getattr(torch, _dtype(args))
    print(f"writing random {args.config} weights ({cfg.num_hidden_layers} layers) to {tmp}")
    write_random_checkpoint(tmp, cfg, seed=0, dtype=dtype)
    return tmp


def _dtype(args: argparse.Namespace) -> str:
    return args.dtype or ("float32" if args.device == "cpu" else "bfloat16")


def _spawn(args: argparse.Namespace, model_dir: str, tmp: str) -> list[dict] | None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.slots), ctx.Queue()
    opts = dict(vars(args), model_dir=model_dir, store_addr=addr, run=uuid.uuid4().hex[:8], tmp=tmp)
    opts.pop("_module", None)
    procs = [
        ctx.Process(target=_worker, args=(slot, opts, barrier, results), daemon=True)
        for slot in range(args.slots)
    ]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    budget_s = 600 + 60 * args.rounds
    try:
        for _ in procs:
            res = results.get(timeout=budget_s)
            out[res["slot"]] = res
    except queue.Empty:
        print(f"ranks {sorted(set(range(args.slots)) - set(out))} did not report in {budget_s} s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    failed = [r for r in out.values() if "error" in r]
    for r in failed:
        print(f"slot {r['slot']} failed: {r['error']}")
    return None if failed or len(out) < args.slots else [out[s] for s in sorted(out)]


# -- one rank ----------------------------------------------------------------------------


def _worker(slot: int, opts: dict, barrier, results) -> None:
    try:
        res = _serve_all(slot, opts, barrier)
    except Exception as exc:  # reported to the parent, which prints it and fails the run
        res = {"slot": slot, "error": f"{type(exc).__name__}: {exc}"}
        barrier.abort()  # peers waiting on us fail fast instead of timing out
    results.put(res)
    results.close()
    results.join_thread()
    os._exit(0)  # a process group's teardown can block on a peer that already left


def _serve_all(slot: int, opts: dict, barrier) -> dict:
    import torch

    from eep.fabrics.base import FabricMember, peer_info_from_dir, publish_to_dir
    from eep.fabrics.factory import make_fabric
    from eep.fabrics.nccl import ensure_process_group

    threads = max(1, (os.cpu_count() or 1) // opts["slots"])
    torch.set_num_threads(threads)
    cpu = opts["device"] == "cpu"
    device = torch.device("cpu") if cpu else torch.device("cuda", slot)
    if not cpu:
        torch.cuda.set_device(device)
        os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    model, view_state, fabric_cfg = _build(slot, opts, device)
    # one process group for the run (the nccl fabric uses it), formed before any fabric
    ensure_process_group(
        opts["store_addr"], slot, opts["slots"], "gloo" if cpu else "nccl", 120, device
    )
    members = {s: 1 for s in range(opts["slots"])}
    fabrics = {}
    for name, kind, elastic in _CPU_FABRICS if cpu else _GPU_FABRICS:
        cluster = f"bench{opts['run']}{name.replace('-', '')}"
        member = FabricMember(
            cluster, slot, 1, device=device, elastic=elastic,
            peer_info=peer_info_from_dir(opts["tmp"], cluster), store_addr=opts["store_addr"],
        )  # fmt: skip
        fabric = make_fabric(kind, fabric_cfg, member)
        fabric.warm_up()  # alone: symm compiles its kernels; the others have nothing to warm
        export = fabric.export()
        if export is not None:  # peers open this slot's buffers from it (symm)
            publish_to_dir(opts["tmp"], cluster, slot, 1, export)
        barrier.wait(timeout=120)  # every buffer exists before any peer maps it
        fabric.apply_view(1, members)
        fabrics[name] = fabric
    # one engine per fabric for the whole run: round 0 compiles (and captures graphs) for all
    engines = {name: _engine(model, fabric, view_state, opts) for name, fabric in fabrics.items()}
    timings: dict[str, list[dict]] = {name: [] for name in fabrics}
    tokens: dict[str, list] = {}
    names = list(fabrics)
    for round_ in range(opts["rounds"] + 1):  # round 0 warms up (compiles, caches)
        # each round starts with another fabric, so no fabric always runs first (or after the
        # same neighbour): an order effect would otherwise read as a fabric's cost
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            barrier.wait(timeout=120)
            outputs, timing = _generate(engines[name], opts)
            if round_:
                timings[name].append(timing)
            tokens.setdefault(name, outputs)
            if outputs != tokens[name]:
                raise AssertionError(f"{name}: tokens changed between rounds")
    barrier.wait(timeout=120)
    for fabric in fabrics.values():
        fabric.close()  # the nccl fabric leaves the group alone: it did not create it
    return {"slot": slot, "timings": timings, "tokens": tokens}


def _build(slot: int, opts: dict, device):
    import torch

    from eep.fabrics.base import FabricConfig
    from eep.membership.view import View
    from eep.model.config import ModelConfig
    from eep.model.qwen3_moe import load_model
    from eep.placement import initial_placement
    from eep.rank.worker import materialised
    from eep.view_state import ViewState

    cfg = ModelConfig.from_dir(opts["model_dir"])
    slots = opts["slots"]
    eps = opts["experts_per_slot"] or -(-cfg.num_experts // slots)
    dtype = getattr(torch, _dtype(argparse.Namespace(**opts)))
    placement = initial_placement(cfg.num_experts, slots, eps)
    local = materialised(placement.slot_experts(slot), cfg.num_experts)
    model = load_model(opts["model_dir"], local, device=device, dtype=dtype)
    view_state = ViewState(slots, eps, cfg.num_experts, placement.max_replicas, device)
    incs = tuple((s, 1) for s in range(slots))
    view_state.apply(View(1, tuple(range(slots)), incs, placement=placement.to_json()))
    fabric_cfg = FabricConfig(
        slots, eps, cfg.hidden_size, cfg.num_experts_per_tok, opts["max_tokens_per_step"],
        dtype, opts["exchange_timeout_s"],
    )  # fmt: skip
    return model, view_state, fabric_cfg


def _engine(model, fabric, view_state, opts: dict):
    from eep.engine.engine import Engine
    from eep.engine.moe_exec import FabricMoE

    blocks = opts["batch"] * -(-(opts["prompt_len"] + opts["gen_len"]) // 16) + 2
    return Engine(
        model,
        blocks,
        16,
        opts["max_tokens_per_step"],
        moe=FabricMoE(fabric, view_state),
        decode_graphs=opts["cuda_graphs"],
    )


def _generate(engine, opts: dict) -> tuple[dict, dict]:
    """The batch to completion; returns ``({request: tokens}, decode timing)``."""
    import torch

    from eep.engine.sampling import SamplingParams
    from eep.engine.sequence import Sequence

    batch, plen, glen = opts["batch"], opts["prompt_len"], opts["gen_len"]
    vocab = engine.model.config.vocab_size
    for i in range(batch):
        gen = torch.Generator().manual_seed(i)
        prompt = torch.randint(0, vocab, (plen,), generator=gen).tolist()
        engine.add(Sequence(f"r{i}", prompt, [], SamplingParams(max_tokens=glen)))
    outputs: dict[str, list[int]] = {}
    decode_s, decode_tokens, decode_steps = 0.0, 0, 0
    while engine.scheduler.has_work():
        sched = engine.scheduler
        decoding = not sched.waiting and all(
            len(s.tokens) - s.num_computed == 1 for s in sched.running
        )
        started = time.perf_counter()
        events = engine.step()  # sampling reads the logits on the host: the step has finished
        elapsed = time.perf_counter() - started
        if decoding:
            decode_s, decode_tokens, decode_steps = (
                decode_s + elapsed, decode_tokens + len(events), decode_steps + 1,
            )  # fmt: skip
        for e in events:
            outputs.setdefault(e.request_id, []).append(e.token)
    return outputs, {"decode_s": decode_s, "tokens": decode_tokens, "steps": decode_steps}


# -- report ------------------------------------------------------------------------------


def _summarise(args: argparse.Namespace, per_rank: list[dict]) -> dict:
    names = list(per_rank[0]["timings"])
    fabrics = {}
    for name in names:
        rounds = []
        for r in range(args.rounds):
            tokens = sum(rank["timings"][name][r]["tokens"] for rank in per_rank)
            slowest = max(rank["timings"][name][r]["decode_s"] for rank in per_rank)
            steps = per_rank[0]["timings"][name][r]["steps"]
            rounds.append({"tokens": tokens, "decode_s": slowest, "steps": steps})
        tps = [r["tokens"] / r["decode_s"] for r in rounds]
        ms = [1000 * r["decode_s"] / max(1, r["steps"]) for r in rounds]
        fabrics[name] = {
            "tokens_per_s": statistics.median(tps),
            "ms_per_step": statistics.median(ms),
            "rounds": rounds,
        }
    same = all(
        rank["tokens"][name] == per_rank[0]["tokens"][names[0]]
        for rank in per_rank
        for name in names
    )
    base = fabrics[names[0]]["tokens_per_s"]
    for f in fabrics.values():
        f["vs_" + names[0]] = f["tokens_per_s"] / base
        # rounds interleave the fabrics, so round r of two fabrics ran under the same drift:
        # the median of per-round ratios is steadier than the ratio of medians
        paired = [
            (r["tokens"] / r["decode_s"]) / (b["tokens"] / b["decode_s"])
            for r, b in zip(f["rounds"], fabrics[names[0]]["rounds"], strict=True)
        ]
        f["paired_vs_" + names[0]] = statistics.median(paired)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    return {"config": config, "fabrics": fabrics, "same_tokens": same, "baseline": names[0]}


def _print(report: dict) -> None:
    cfg, base = report["config"], report["baseline"]
    print(
        f"\n{cfg['slots']} slots x {cfg['batch']} requests, prompt {cfg['prompt_len']}, "
        f"gen {cfg['gen_len']}, {cfg['rounds']} rounds (medians), device {cfg['device']}, "
        f"decode steps {'padded, CUDA graphs' if cfg.get('cuda_graphs') else 'eager'}"
    )
    print(
        f"| fabric | decode tok/s (all ranks) | ms/decode step | vs {base} "
        f"| vs {base}, median of per-round ratios |"
    )
    print("|---|---|---|---|---|")
    for name, f in report["fabrics"].items():
        ratio, paired = f["vs_" + base], f["paired_vs_" + base]
        print(
            f"| {name} | {f['tokens_per_s']:.1f} | {f['ms_per_step']:.2f} | {ratio:.3f}x "
            f"| {paired:.3f}x |"
        )
    print(f"same tokens under every fabric: {'yes' if report['same_tokens'] else 'NO'}")
