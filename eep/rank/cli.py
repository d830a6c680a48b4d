"""Arguments of ``python -m eep.rank``: the slot supervisor that torchrun starts, one per slot.

The runtime's own command line, kept here so that ``eep.rank`` needs nothing from
``eep.tools``. The etcd flags are the ones every ``eep`` command takes
(:func:`eep.membership.cli.add_etcd_arguments`).
"""

from __future__ import annotations

import argparse
import logging
import os

from eep.config import DEFAULT_TTL_S
from eep.membership.cli import add_etcd_arguments

from .supervisor import SupervisorConfig
from .supervisor import main as supervise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eep.rank",
        description="Supervise one slot: hold its etcd lease, run its worker, restart it. "
        "Usually started by `eep launch` through torchrun.",
    )
    add_etcd_arguments(parser)
    parser.add_argument(
        "--slot", type=int, default=None, help="the slot (default: torchrun's LOCAL_RANK)"
    )
    parser.add_argument(
        "--ttl", type=int, default=DEFAULT_TTL_S, help=f"lease TTL in s (default {DEFAULT_TTL_S})"
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=100,
        help="worker restarts before the supervisor gives up (default 100)",
    )
    parser.add_argument("--log-dir", default=None, help="write worker logs here")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="the full-restart baseline: exit non-zero when the worker ends instead of "
        "restarting it, so a torchrun over every slot restarts them all",
    )
    parser.add_argument(
        "--no-standby",
        action="store_true",
        help="start each worker cold instead of promoting a warm standby (a standby is a "
        "worker process with its imports and device context done, idle until its slot's "
        "worker dies; it costs its resident memory and, on a GPU, a CUDA context)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    agent = os.getppid()  # first: the supervisor stops with the agent that started it
    args = build_parser().parse_args(argv)
    slot = args.slot if args.slot is not None else int(os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s supervisor{slot}: %(message)s"
    )
    return supervise(
        SupervisorConfig(
            etcd=args.etcd,
            cluster=args.cluster,
            slot=slot,
            ttl_s=args.ttl,
            max_restarts=args.max_restarts,
            log_dir=args.log_dir,
            baseline=args.baseline,
            standby=not args.no_standby,
            group_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if args.baseline else 0,
            group_round=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        ),
        stop_with_parent=agent if "TORCHELASTIC_RUN_ID" in os.environ else 0,
    )
