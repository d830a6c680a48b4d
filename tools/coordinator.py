"""``eep coordinator``: a membership coordinator process (leader-elected; run several)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading

from eep.membership.coordinator import Coordinator, CoordinatorConfig, keep_placement
from eep.membership.errors import EtcdUnavailable, clip
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys

from .common import add_etcd_arguments, connect, load_callable

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_etcd_arguments(parser)
    parser.add_argument("--ttl", type=int, default=3, help="leadership lease TTL in s (default 3)")
    parser.add_argument(
        "--debounce",
        type=float,
        default=0.1,
        metavar="S",
        help="wait this long after a slot change to batch concurrent failures (default 0.1)",
    )
    parser.add_argument(
        "--planner",
        default=None,
        metavar="MODULE:FACTORY",
        help="placement planner factory f(etcd_client, keys) returning "
        "planner(members, previous_view) -> JSON payload (default: carry the placement over; "
        "the runtime's is eep.planner:from_cluster)",
    )
    parser.add_argument(
        "--initial-members",
        type=int,
        default=1,
        metavar="N",
        help="commit the first view only once N slots are ready (default 1)",
    )
    parser.add_argument(
        "--num-slots",
        type=int,
        default=None,
        metavar="N",
        help="the cluster's slot count: records of other slots are ignored as malformed "
        "(default: num_slots of the runtime config in etcd, if there is one)",
    )
    parser.add_argument("--identity", default="", help="name shown as leader (default host:pid)")


def cluster_num_slots(client: EtcdClient, keys: Keys) -> int | None:
    """``num_slots`` of the cluster's runtime config, or None (no config, or an unreadable
    one: then slot numbers are checked against nothing but the record's own key)."""
    kv = client.get(keys.config)
    if kv is None:
        return None
    try:
        value = json.loads(kv.value).get("num_slots")
    except (ValueError, RecursionError, AttributeError) as exc:
        log.warning("%s is unreadable (%s); slot numbers are not bounded", keys.config, exc)
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        log.warning("%s has num_slots %s; slot numbers are not bounded", keys.config, clip(value))
        return None
    return value


def run(args: argparse.Namespace) -> int:
    client, keys = connect(args)
    if args.num_slots is not None and args.num_slots < 1:
        log.error("--num-slots must be >= 1, got %d", args.num_slots)
        return 2
    try:
        client.revision()
        num_slots = args.num_slots or cluster_num_slots(client, keys)
    except EtcdUnavailable as exc:
        log.error("%s", exc)
        return 2
    planner = load_callable(args.planner)(client, keys) if args.planner else keep_placement
    config = CoordinatorConfig(
        ttl_s=args.ttl,
        debounce_s=args.debounce,
        max_debounce_s=max(0.5, args.debounce),
        identity=args.identity,
        initial_members=args.initial_members,
        num_slots=num_slots,
    )
    coordinator = Coordinator(client, keys, planner, config)
    stopped = threading.Event()

    def _stop(signum, frame):
        stopped.set()
        coordinator.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info(
        "coordinator for cluster %r on etcd %s (num_slots %s)", keys.cluster, args.etcd, num_slots
    )
    coordinator.run()
    return 0
