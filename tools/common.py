"""Arguments every command shares, and the one place that reads ``EEP_*`` variables."""

from __future__ import annotations

import argparse
import importlib
import os

from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys

ENV_ETCD = "EEP_ETCD"
ENV_CLUSTER = "EEP_CLUSTER"


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--etcd",
        default=env(ENV_ETCD, "127.0.0.1:2379"),
        help="etcd endpoints, host:port[,host:port] (default: $EEP_ETCD or 127.0.0.1:2379)",
    )
    parser.add_argument(
        "--cluster",
        default=env(ENV_CLUSTER, "default"),
        help="cluster name: keys live under /eep/<cluster>/ (default: $EEP_CLUSTER or 'default')",
    )
    parser.add_argument(
        "--etcd-timeout", type=float, default=2.0, metavar="S", help="per-request timeout (s)"
    )


def add_data_plane_arguments(parser: argparse.ArgumentParser) -> None:
    """The data-plane options of a launched cluster (``eep launch``, ``eep bench recovery``);
    read back with :func:`exchange_timeout_s` and :func:`cuda_graphs`."""
    parser.add_argument(
        "--exchange-timeout",
        type=float,
        default=None,
        metavar="S",
        help="bounded wait on a peer per step before the step is discarded (default 2 s on "
        "cpu, 0.5 s on cuda)",
    )
    add_cuda_graphs_argument(parser)


def add_cuda_graphs_argument(parser: argparse.ArgumentParser) -> None:
    """``--cuda-graphs``/``--no-cuda-graphs``, read back with :func:`cuda_graphs`."""
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run decode steps on padded static buffers and replay them from CUDA graphs "
        "(the symm fabric on GPUs; the nccl fabric runs the same padded steps eagerly, and "
        "CPU ranks run them eagerly). Default: on with --device cuda, off on cpu",
    )


def cuda_graphs(args: argparse.Namespace) -> bool:
    return args.device == "cuda" if args.cuda_graphs is None else args.cuda_graphs


def exchange_timeout_s(args: argparse.Namespace) -> float:
    return args.exchange_timeout or (0.5 if args.device == "cuda" else 2.0)


def connect(args: argparse.Namespace) -> tuple[EtcdClient, Keys]:
    return EtcdClient(args.etcd, timeout_s=args.etcd_timeout), Keys(args.cluster)


def load_callable(spec: str):
    """``package.module:function`` -> the function (for pluggable planners)."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise SystemExit(f"--planner {spec!r} must be of the form package.module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"cannot load planner {spec!r}: {exc}") from exc


def scrape_metrics(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """The front-end's ``/metrics`` as ``{sample: value}``, parsed by ``prometheus_client``;
    a labelled sample is keyed ``name{label="value"}``."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    resp = requests.get(f"{url}/metrics", timeout=timeout_s)
    resp.raise_for_status()
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
