"""The runtime configuration of one cluster: written to ``/eep/<cluster>/config`` by the
launcher, read from there by every supervisor, worker and the front-end.

Every device-dependent default is defined here once (:func:`default_exchange_timeout_s`,
:func:`default_dtype`, :func:`default_fabric`, :func:`default_cuda_graphs`) and applied on every
construction path: a field left ``None`` is resolved from ``device`` when the config is made.
:meth:`RuntimeConfig.for_cluster` is the one builder the launcher, the demo, the benches and
the e2e tests use. No torch here: the front-end imports this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64", "bfloat16", "float16")
FABRICS = ("shm", "symm", "nccl", "te")
DEFAULT_SLOTS = 4
DEFAULT_TTL_S = 3  # lease TTL, s
# decode buckets that hold a captured CUDA graph at once (eep.engine.decode_graph): one per
# (rows, context) power-of-two pair, so 16 covers e.g. 4 batch sizes x 4 context lengths
DEFAULT_MAX_CUDA_GRAPHS = 16

# the bounded wait on a peer in one expert exchange before the step is discarded, in seconds
_EXCHANGE_TIMEOUT_S = {"cuda": 0.5, "cpu": 2.0}


def default_exchange_timeout_s(device: str) -> float:
    """The exchange timeout, in seconds, a cluster on ``device`` gets unless one is given:
    0.5 s on "cuda" (a GPU step takes milliseconds), 2.0 s on "cpu"."""
    return _EXCHANGE_TIMEOUT_S[_checked_device(device)]


def default_dtype(device: str, exact: bool = False) -> str:
    """bfloat16 on "cuda"; float32 on "cpu", or float64 with ``exact``: where outputs are
    compared token for token with a single-process run (the demo, the benches, the e2e
    tests), since a rank batches other requests than the reference does and in float64 those
    different summation orders cannot flip a greedy token."""
    if _checked_device(device) == "cuda":
        return "bfloat16"
    return "float64" if exact else "float32"


def default_fabric(device: str, baseline: bool = False) -> str:
    """shm on "cpu" (elastic or not); on "cuda" symm, or nccl for the fixed-membership
    baseline."""
    if _checked_device(device) == "cpu":
        return "shm"
    return "nccl" if baseline else "symm"


def default_cuda_graphs(device: str) -> bool:
    """Decode steps replayed from CUDA graphs: on with "cuda", off on "cpu"."""
    return _checked_device(device) == "cuda"


def default_standby_stage(device: str) -> bool:
    """A standby stages its slot's memory (model, expert and KV arenas, transfer engine): on
    with "cpu", where that memory is host memory; off on "cuda", where it would hold a second
    copy of the slot's arenas in device memory."""
    return _checked_device(device) == "cpu"


def _checked_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"RuntimeConfig.device {device!r} must be one of {DEVICES}.")
    return device


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    cluster: str
    model_path: str
    num_slots: int
    experts_per_slot: int
    device: str = "cpu"  # "cpu" or "cuda" (each slot takes cuda:<slot % device_count>)
    dtype: str | None = None  # None: default_dtype(device)
    fabric: str = "shm"
    ttl_s: int = DEFAULT_TTL_S
    exchange_timeout_s: float | None = None  # s; None: default_exchange_timeout_s(device)
    max_tokens_per_step: int = 64
    max_num_seqs: int = 256  # sequences one rank decodes at once; the rest wait on the rank
    kv_blocks: int = 256
    block_size: int = 16
    model_name: str = "eep"
    elastic: bool = True  # False: the fixed-membership baseline
    fabric_store: str = ""  # host:port of the TCP store the nccl fabric rendezvous at
    # decode steps padded, replayed from CUDA graphs (symm on GPU); None: on with device
    # "cuda" (eep launch --no-cuda-graphs turns it off), off on "cpu"
    cuda_graphs: bool | None = None
    # with cuda_graphs: decode buckets holding a captured graph at once, at most; capturing one
    # more evicts the least recently replayed (eep.engine.decode_graph says what that frees)
    max_cuda_graphs: int = DEFAULT_MAX_CUDA_GRAPHS
    # fault-injection hook, off (0) in service: a worker's first pull of its experts, once
    # planned, is held open this long before any byte moves, so `eep bench chaos` can kill
    # the rejoining worker or one of its sources mid-pull (the tiny model's pull takes ms)
    pull_hold_s: float = 0.0
    # a slot's warm standby also stages what its worker builds before the pull: the transfer
    # engine, the KV arena, the model's dense weights and the expert arena (allocated, not
    # filled: the experts are still pulled from live peers once promoted). It costs the
    # standby that memory. None: default_standby_stage(device) (on cpu, off on cuda)
    standby_stage: bool | None = None
    # admission (the front-end): prompt + max_tokens of one request, at most; 0: the most one
    # rank can hold (rank_kv_tokens), or the model's own limit where that is lower
    max_model_len: int = 0
    # requests accepted but not yet running anywhere, at most; beyond it a request gets 429
    max_queue: int = 1024
    # a request re-queued off this many failed ranks is failed instead of re-queued again;
    # 3, not 2: two independent faults within a TTL (which the chaos matrix injects) strand a
    # request twice with nothing it did wrong, and nothing a user asked for may be lost to that
    quarantine_after: int = 3
    # the 0600 file holding the cluster's secret, which ranks prove they know in their hello
    # (the launcher makes it; "" only where no front-end runs)
    secret_file: str = ""

    @property
    def rank_kv_tokens(self) -> int:
        """Tokens of KV one rank holds for requests: its blocks, less the scratch block that
        padded decode steps take (``cuda_graphs``)."""
        return (self.kv_blocks - (1 if self.cuda_graphs else 0)) * self.block_size

    def __post_init__(self) -> None:
        device = _checked_device(self.device)
        if self.dtype is None:
            object.__setattr__(self, "dtype", default_dtype(device))
        if self.exchange_timeout_s is None:
            object.__setattr__(self, "exchange_timeout_s", default_exchange_timeout_s(device))
        if self.cuda_graphs is None:
            object.__setattr__(self, "cuda_graphs", default_cuda_graphs(device))
        if self.standby_stage is None:
            object.__setattr__(self, "standby_stage", default_standby_stage(device))
        for name in _AT_LEAST_ONE:
            _at_least_one(name, getattr(self, name))
        if self.dtype not in DTYPES:
            raise ValueError(f"RuntimeConfig.dtype {self.dtype!r} must be one of {DTYPES}.")
        if self.fabric not in FABRICS:
            raise ValueError(f"RuntimeConfig.fabric {self.fabric!r} must be one of {FABRICS}.")
        if not self.exchange_timeout_s > 0:
            raise ValueError(
                f"RuntimeConfig.exchange_timeout_s must be > 0 s, got {self.exchange_timeout_s!r}."
            )
        if self.max_model_len < 0 or self.max_model_len > self.rank_kv_tokens:
            raise ValueError(
                f"RuntimeConfig.max_model_len must be in [0, {self.rank_kv_tokens}] (0: as much "
                f"as one rank's KV cache holds, {self.rank_kv_tokens} tokens), got "
                f"{self.max_model_len!r}."
            )
        if self.max_queue < 0:
            raise ValueError(f"RuntimeConfig.max_queue must be >= 0, got {self.max_queue!r}.")
        if self.quarantine_after < 1:
            raise ValueError(
                f"RuntimeConfig.quarantine_after must be >= 1, got {self.quarantine_after!r}."
            )
        if not self.pull_hold_s >= 0:
            raise ValueError(
                "RuntimeConfig.pull_hold_s must be >= 0 s (0 turns the fault-injection hold "
                f"off), got {self.pull_hold_s!r}."
            )

    @classmethod
    def for_cluster(
        cls,
        cluster: str,
        model_path: str,
        num_slots: int = DEFAULT_SLOTS,
        *,
        num_experts: int | None = None,
        experts_per_slot: int | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        exact: bool = False,
        fabric: str | None = None,
        baseline: bool = False,
        **settings: Any,
    ) -> RuntimeConfig:
        """The config of a cluster of ``num_slots`` ranks serving ``model_path`` (made
        absolute: every process reads it). ``experts_per_slot`` None: room for two replicas
        of each of the model's ``num_experts`` (:func:`eep.placement.two_replica_experts_per_slot`);
        ``dtype`` None: :func:`default_dtype` (``exact``: float64 on cpu); ``fabric`` None:
        :func:`default_fabric` (``baseline``: the fixed-membership baseline's). ``settings``:
        any other field (``ttl_s``, ``exchange_timeout_s``, ``cuda_graphs``, ...); a ``None``
        there takes the field's default. A bad value is a ``ValueError`` naming the field."""
        if experts_per_slot is None:
            from eep.placement import two_replica_experts_per_slot

            if num_experts is None or not num_experts >= 1:
                raise ValueError(
                    "RuntimeConfig.experts_per_slot: give it, or the model's num_experts (>= 1), "
                    f"got {num_experts!r}."
                )
            _at_least_one("num_slots", num_slots)
            experts_per_slot = two_replica_experts_per_slot(num_experts, num_slots)
        fabric = fabric or default_fabric(device, baseline)
        if (fabric, device) in (("symm", "cpu"), ("shm", "cuda"), ("te", "cuda")):
            raise ValueError(
                f"RuntimeConfig.fabric {fabric!r} does not run on device {device!r}: shm is for "
                "CPU processes (te: across hosts), symm for GPUs."
            )
        if fabric == "nccl" and not baseline:
            raise ValueError(
                "RuntimeConfig.fabric 'nccl' has a fixed membership: only the full-restart "
                "baseline (--baseline) runs it."
            )
        given = {k: v for k, v in settings.items() if v is not None}
        return cls(
            cluster=cluster,
            model_path=os.path.abspath(model_path),
            num_slots=num_slots,
            experts_per_slot=experts_per_slot,
            device=device,
            dtype=dtype or default_dtype(device, exact),
            fabric=fabric,
            **given,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> RuntimeConfig:
        """The config read back; a ``ValueError`` that says what is wrong for anything else
        (not JSON, not an object, unknown or missing fields, values of the wrong type)."""
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"runtime config is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"runtime config must be a JSON object, got {type(obj).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"runtime config has unknown fields {sorted(unknown)}.")
        try:
            return cls(**obj)
        except TypeError as exc:  # a missing field, or a value its check cannot compare
            raise ValueError(f"runtime config is malformed: {exc}") from exc

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


_AT_LEAST_ONE = (
    "num_slots",
    "experts_per_slot",
    "ttl_s",
    "max_tokens_per_step",
    "max_num_seqs",
    "kv_blocks",
    "block_size",
    "max_cuda_graphs",
)


def _at_least_one(name: str, value: int) -> None:
    if not value >= 1:
        raise ValueError(f"RuntimeConfig.{name} must be >= 1, got {value!r}.")
