"""``eep launch``: a whole cluster on this host, until Ctrl-C.

With ``--tiny`` a tiny random-weight Qwen3-MoE is generated (once, under .eep/models/tiny)
so that nothing has to be downloaded.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import uuid

from .common import add_data_plane_arguments, cuda_graphs, exchange_timeout_s

TINY_DIR = os.path.join(".eep", "models", "tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="a Hugging Face style directory (config.json + safetensors)")
    model.add_argument("--tiny", action="store_true", help="generate and serve a tiny random model")
    parser.add_argument("--slots", type=int, default=4, help="EP slots (ranks) (default 4)")
    parser.add_argument(
        "--experts-per-slot",
        type=int,
        default=None,
        help="physical experts per slot (default: room for 2 replicas of each)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32|float64|bfloat16 (default float32 on cpu, bfloat16 on cuda)",
    )
    parser.add_argument(
        "--fabric",
        choices=["shm", "symm", "nccl"],
        default=None,
        help="data plane: shm (elastic, CPU processes on one host; the CPU default), symm "
        "(elastic, the Triton kernels over CUDA IPC buffers; the GPU default) or nccl (the "
        "fixed-membership baseline's collectives, its GPU default; gloo on the CPU; only with "
        "--baseline)",
    )
    add_data_plane_arguments(parser)
    parser.add_argument("--etcd", default=None, help="use this etcd (default: start one)")
    parser.add_argument("--cluster", default=None, help="cluster name (default: random)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--ttl", type=int, default=3, help="lease TTL in s (default 3)")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="torchrun restarts of a slot's supervisor (default 3)",
    )
    parser.add_argument(
        "--no-torchrun",
        action="store_true",
        help="start supervisors directly instead of under torchrun",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="the full-restart baseline: one torchrun over every slot, so one failed worker "
        "restarts them all (each reloading its weights from disk)",
    )
    parser.add_argument("--log-dir", default=None, help="keep every process's log here")


def tiny_model() -> str:
    from eep.model.config import ModelConfig
    from eep.model.random_weights import write_random_checkpoint

    if not os.path.exists(os.path.join(TINY_DIR, "config.json")):
        import torch

        write_random_checkpoint(TINY_DIR, ModelConfig.tiny(), seed=0, dtype=torch.float32)
    return TINY_DIR


def runtime_config(args: argparse.Namespace, model_path: str):
    from eep.config import RuntimeConfig
    from eep.model.config import ModelConfig
    from eep.placement import two_replica_experts_per_slot

    num_experts = ModelConfig.from_dir(model_path).num_experts
    gpu_default = "nccl" if getattr(args, "baseline", False) else "symm"
    fabric = args.fabric or (gpu_default if args.device == "cuda" else "shm")
    if (fabric, args.device) in (("symm", "cpu"), ("shm", "cuda")):
        raise SystemExit(
            f"--fabric {fabric} does not run on --device {args.device}: "
            "shm is for CPU processes, symm for GPUs"
        )
    eps = args.experts_per_slot or two_replica_experts_per_slot(num_experts, args.slots)
    return RuntimeConfig(
        cluster=args.cluster or f"eep-{uuid.uuid4().hex[:6]}",
        model_path=os.path.abspath(model_path),
        num_slots=args.slots,
        experts_per_slot=eps,
        device=args.device,
        dtype=args.dtype or ("float32" if args.device == "cpu" else "bfloat16"),
        fabric=fabric,
        ttl_s=args.ttl,
        exchange_timeout_s=exchange_timeout_s(args),
        cuda_graphs=cuda_graphs(args),
    )


def run(args: argparse.Namespace) -> int:
    from eep.launcher import Cluster, ClusterOptions, LaunchError

    if args.fabric == "nccl" and not args.baseline:
        raise SystemExit("--fabric nccl has a fixed membership: use it with --baseline")
    if args.baseline and args.no_torchrun:
        raise SystemExit("--baseline runs every slot under one torchrun: drop --no-torchrun")
    model_path = tiny_model() if args.tiny else args.model
    cfg = runtime_config(args, model_path)
    opts = ClusterOptions(
        cfg,
        etcd=args.etcd,
        http_port=args.port,
        torchrun=not args.no_torchrun,
        max_restarts=args.max_restarts,
        log_dir=args.log_dir,
        baseline=args.baseline,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    mode = " (full-restart baseline: one torchrun over every slot)" if args.baseline else ""
    print(
        f"starting cluster {cfg.cluster}: {cfg.num_slots} slots x {cfg.experts_per_slot} "
        f"experts, model {model_path}{mode} ...",
        flush=True,
    )
    try:
        cluster = Cluster(opts).start()
    except LaunchError as exc:
        print(f"eep launch: {exc}")
        return 1
    print(
        f"serving at {cluster.url}/v1/completions (etcd {cluster.endpoint}, logs in "
        f"{cluster.workdir}); Ctrl-C stops",
        flush=True,
    )
    stop.wait()
    cluster.stop()
    return 0
