"""Arguments every command shares (the etcd flags, which read ``EEP_*`` variables, come from
:mod:`eep.membership.cli`).

The commands that start a cluster (``eep launch``, ``eep demo``, ``eep bench recovery``,
``eep bench chaos``) take their cluster-shape flags from :func:`add_cluster_arguments` and
make their :class:`~eep.config.RuntimeConfig` with :func:`runtime_config`, which applies the
defaults of :mod:`eep.config` through :meth:`RuntimeConfig.for_cluster`.
"""

from __future__ import annotations

import argparse
import importlib
import uuid
from typing import Any

from eep.config import (
    DEFAULT_SLOTS,
    DEFAULT_TTL_S,
    DEVICES,
    DTYPES,
    FABRICS,
    RuntimeConfig,
    default_cuda_graphs,
    default_exchange_timeout_s,
)
from eep.membership.cli import add_etcd_arguments  # noqa: F401 (the commands import it here)
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys


def _default(field: str) -> Any:
    """The default of a :class:`RuntimeConfig` field, for a flag's help."""
    return RuntimeConfig.__dataclass_fields__[field].default


# the cluster-shape flags of the commands that start a cluster (eep launch, the demo, the
# benches): each defined once here, with its default and help. name -> (flags, options)
_CLUSTER_FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "slots": (
        ("--slots",),
        dict(
            type=int,
            default=DEFAULT_SLOTS,
            help=f"EP slots, one rank each (default {DEFAULT_SLOTS})",
        ),
    ),
    "experts_per_slot": (
        ("--experts-per-slot",),
        dict(
            type=int,
            default=None,
            help="physical experts per slot (default: room for 2 replicas of each)",
        ),
    ),
    "device": (
        ("--device",),
        dict(choices=DEVICES, default="cpu", help="where ranks run (default cpu)"),
    ),
    "dtype": (
        ("--dtype",),
        dict(
            choices=DTYPES,
            default=None,
            help="default bfloat16 on cuda; on cpu float32, float64 where outputs are checked "
            "token for token against a single-process run (the demo and the benches)",
        ),
    ),
    "fabric": (
        ("--fabric",),
        dict(
            choices=FABRICS,
            default=None,
            help="data plane: shm (elastic, CPU processes on one host; the CPU default), symm "
            "(elastic, the Triton kernels over CUDA IPC buffers; the GPU default) or nccl (the "
            "fixed-membership baseline's collectives, its GPU default; gloo on the CPU; only "
            "with --baseline) or te (elastic, CPU ranks on several hosts: shared memory within "
            "a host, the Mooncake Transfer Engine's one-sided writes across hosts)",
        ),
    ),
    "ttl": (
        ("--ttl",),
        dict(type=int, default=DEFAULT_TTL_S, help=f"lease TTL in s (default {DEFAULT_TTL_S})"),
    ),
    "exchange_timeout": (
        ("--exchange-timeout",),
        dict(
            type=float,
            default=None,
            metavar="S",
            help="bounded wait on a peer per step, in seconds, before the step is discarded "
            f"(default {default_exchange_timeout_s('cpu'):g} s on cpu, "
            f"{default_exchange_timeout_s('cuda'):g} s on cuda)",
        ),
    ),
}
_CLUSTER_FLAGS |= {
    "max_model_len": (
        ("--max-model-len",),
        dict(
            type=int,
            default=None,
            metavar="TOKENS",
            help="the context of one request, prompt + max_tokens, at most; a request asking "
            "for more is refused with a 400 that names the numbers, and one that omits "
            "max_tokens may generate up to it. Default: what one rank's KV cache holds "
            f"({_default('kv_blocks')} blocks of {_default('block_size')} tokens), or the model's "
            "max_position_embeddings where lower",
        ),
    ),
    "max_num_seqs": (
        ("--max-num-seqs",),
        dict(
            type=int,
            default=None,
            metavar="N",
            help="sequences one rank decodes at once; the others it was given wait on the rank "
            f"(default {_default('max_num_seqs')})",
        ),
    ),
    "max_queue": (
        ("--max-queue",),
        dict(
            type=int,
            default=None,
            metavar="N",
            help="requests the front-end holds while no slot's KV has room for them; one more "
            "is answered 429 with a Retry-After header (default "
            f"{_default('max_queue')}; 0: answer 429 whenever no slot has room)",
        ),
    ),
    "quarantine_after": (
        ("--quarantine-after",),
        dict(
            type=int,
            default=None,
            metavar="K",
            help="a request that was running on K ranks that died is failed (HTTP 500, code "
            "quarantined) instead of re-queued again: it may be what kills them (default "
            f"{_default('quarantine_after')})",
        ),
    ),
    "standby_stage": (
        ("--standby-stage",),
        dict(
            action=argparse.BooleanOptionalAction,
            default=None,
            help="a warm standby also builds what its worker needs before the pull (model, "
            "expert and KV arenas, transfer engine), so a promotion only pulls the experts and "
            "rejoins; it costs the standby about the memory of an active worker. Default: on "
            "with --device cpu, off on cuda (it would hold the slot's arenas twice in GPU memory)",
        ),
    ),
}
# the flag (argparse dest) -> the RuntimeConfig field it gives
_FIELD_OF = {
    "slots": "num_slots",
    "experts_per_slot": "experts_per_slot",
    "device": "device",
    "dtype": "dtype",
    "fabric": "fabric",
    "ttl": "ttl_s",
    "exchange_timeout": "exchange_timeout_s",
    "cuda_graphs": "cuda_graphs",
    "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs",
    "max_queue": "max_queue",
    "quarantine_after": "quarantine_after",
    "standby_stage": "standby_stage",
}
CLUSTER_FLAGS = tuple(_FIELD_OF)


def add_cluster_arguments(parser: argparse.ArgumentParser, *names: str) -> None:
    """The cluster-shape flags ``names`` (all of :data:`CLUSTER_FLAGS` if none are named), in
    that order; :func:`runtime_config` reads them back."""
    for name in names or CLUSTER_FLAGS:
        if name == "cuda_graphs":
            add_cuda_graphs_argument(parser)
        else:
            flags, options = _CLUSTER_FLAGS[name]
            parser.add_argument(*flags, **options)


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


def runtime_config(
    args: argparse.Namespace, model_path: str, cluster: str, **settings: Any
) -> RuntimeConfig:
    """The :class:`RuntimeConfig` of a cluster started from the command line: the flags of
    :func:`add_cluster_arguments` that ``args`` has (a flag not given, or one the command
    lacks, takes the builder's default), then ``settings`` (``exact``, ``baseline``, any
    field), through :meth:`RuntimeConfig.for_cluster`. Reads the model's ``config.json``. A
    bad value is a ``ValueError`` naming the field."""
    from eep.model.config import ModelConfig

    given = {field: getattr(args, flag) for flag, field in _FIELD_OF.items() if hasattr(args, flag)}
    num_experts = ModelConfig.from_dir(model_path).num_experts
    return RuntimeConfig.for_cluster(
        cluster, model_path, num_experts=num_experts, **(given | settings)
    )


def new_cluster_name(prefix: str) -> str:
    """A fresh cluster name: ``<prefix>-`` and 6 random hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def cuda_graphs(args: argparse.Namespace) -> bool:
    """``--cuda-graphs`` resolved: on with ``--device cuda`` unless given."""
    return default_cuda_graphs(args.device) if args.cuda_graphs is None else args.cuda_graphs


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
