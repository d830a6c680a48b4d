"""The etcd flags every command takes, and the one place that reads ``EEP_ETCD`` and
``EEP_CLUSTER``: ``eep`` (``eep.tools``) and the slot supervisor (``python -m eep.rank``)
both add them with :func:`add_etcd_arguments`."""

from __future__ import annotations

import argparse
import os

ENV_ETCD = "EEP_ETCD"
ENV_CLUSTER = "EEP_CLUSTER"
DEFAULT_ETCD = "127.0.0.1:2379"


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--etcd",
        default=os.environ.get(ENV_ETCD, DEFAULT_ETCD),
        help=f"etcd endpoints, host:port[,host:port] (default: ${ENV_ETCD} or {DEFAULT_ETCD})",
    )
    parser.add_argument(
        "--cluster",
        default=os.environ.get(ENV_CLUSTER, "default"),
        help=f"cluster name: keys live under /eep/<cluster>/ (default: ${ENV_CLUSTER} or "
        "'default')",
    )
    parser.add_argument(
        "--etcd-timeout", type=float, default=2.0, metavar="S", help="per-request timeout (s)"
    )
