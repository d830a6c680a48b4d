"""``eep launch``: a whole cluster on this host, until Ctrl-C.

With ``--tiny`` a tiny random-weight Qwen3-MoE is generated (once, under .eep/models/tiny)
so that nothing has to be downloaded. While it waits for Ctrl-C, the cluster's own supervision
thread (``eep.launcher.Cluster``) restarts the front-end, on the same port, and the
coordinators whenever one exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from . import common
from .common import add_cluster_arguments

TINY_DIR = os.path.join(".eep", "models", "tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="a Hugging Face style directory (config.json + safetensors)")
    model.add_argument("--tiny", action="store_true", help="generate and serve a tiny random model")
    add_cluster_arguments(parser)
    parser.add_argument("--etcd", default=None, help="use this etcd (default: start one)")
    parser.add_argument("--cluster", default=None, help="cluster name (default: random)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
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
    parser.add_argument(
        "--coordinators",
        type=int,
        default=2,
        help="membership coordinators: one leader and standbys that take over when it dies "
        "(default 2)",
    )
    parser.add_argument(
        "--standby",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep a warm standby worker per slot, promoted when the slot's worker dies: its "
        "imports and device context are done (and, with --standby-stage, its model and "
        "arenas are built), so the slot is back sooner (default on; it costs each slot a "
        "second worker process's resident memory, and a CUDA context on a GPU)",
    )
    parser.add_argument("--log-dir", default=None, help="keep every process's log here")
    hosts = parser.add_argument_group(
        "several hosts",
        "one `eep launch` per host against one etcd (3 members, one per host, recommended). "
        "The first host starts the cluster: its runtime config, the coordinators, the "
        "front-end and its own --host-slots. Every other host adds --join with the same --etcd "
        "and --cluster and its own --host-slots; it reads the runtime config from etcd. Each "
        "host gives --host-id and --address; the cluster's secret file must be at the same "
        "path on every host. Use --fabric te (CPU) so peers on other hosts are reached "
        "through the Mooncake Transfer Engine.",
    )
    hosts.add_argument(
        "--host-slots",
        default=None,
        help="the slots this host runs, e.g. 0,1 (default: every slot)",
    )
    hosts.add_argument(
        "--join",
        action="store_true",
        help="join the cluster another host started (needs --etcd and --cluster)",
    )
    hosts.add_argument(
        "--host-id",
        default="",
        help="this host's name in the cluster (default: its hostname); `eep inspect` shows it",
    )
    hosts.add_argument(
        "--address",
        default="",
        help="the address other hosts reach this host's ranks and front-end at (default "
        "127.0.0.1: a one-host cluster; nothing listens beyond it unless given)",
    )


def tiny_model() -> str:
    from eep.model.config import ModelConfig
    from eep.model.random_weights import write_random_checkpoint

    if not os.path.exists(os.path.join(TINY_DIR, "config.json")):
        import torch

        write_random_checkpoint(TINY_DIR, ModelConfig.tiny(), seed=0, dtype=torch.float32)
    return TINY_DIR


def runtime_config(args: argparse.Namespace, model_path: str):
    """The cluster's :class:`~eep.config.RuntimeConfig` from ``eep launch``'s flags."""
    try:
        return common.runtime_config(
            args,
            model_path,
            args.cluster or common.new_cluster_name("eep"),
            baseline=args.baseline,
        )
    except ValueError as exc:
        raise SystemExit(f"eep launch: {exc}") from None


def _options(args: argparse.Namespace, cfg, slots: tuple[int, ...] | None):
    from eep.launcher import ClusterOptions

    return ClusterOptions(
        cfg,
        etcd=args.etcd,
        http_port=args.port,
        torchrun=not args.no_torchrun,
        max_restarts=args.max_restarts,
        log_dir=args.log_dir,
        baseline=args.baseline,
        coordinators=args.coordinators,
        standby=args.standby,
        slots=slots,
        join=args.join,
        host_id=args.host_id,
        address=args.address,
    )


def run(args: argparse.Namespace) -> int:
    from eep.launcher import Cluster, LaunchError

    if args.baseline and args.no_torchrun:
        raise SystemExit("--baseline runs every slot under one torchrun: drop --no-torchrun")
    if args.join and not (args.etcd and args.cluster):
        raise SystemExit("eep launch: --join needs the cluster's --etcd and --cluster")
    slots = None
    if args.host_slots:
        try:
            slots = tuple(int(s) for s in args.host_slots.split(","))
        except ValueError:
            raise SystemExit(
                f"eep launch: --host-slots {args.host_slots!r}: give slots as 0,1,2"
            ) from None
    model_path = tiny_model() if args.tiny else args.model
    cfg = runtime_config(args, model_path)
    try:
        opts = _options(args, cfg, slots)
    except ValueError as exc:
        raise SystemExit(f"eep launch: {exc}") from None

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
    if cluster.restarts:
        print(f"restarted while serving: {cluster.restarts}", flush=True)
    return 0
