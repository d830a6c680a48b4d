"""The runtime configuration of one cluster: written to ``/eep/<cluster>/config`` by the
launcher, read from there by every supervisor, worker and the front-end."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

_DTYPES = ("float32", "float64", "bfloat16", "float16")
_FABRICS = ("shm", "symm", "nccl")


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    cluster: str
    model_path: str
    num_slots: int
    experts_per_slot: int
    device: str = "cpu"  # "cpu" or "cuda" (each slot takes cuda:<slot % device_count>)
    dtype: str = "float32"
    fabric: str = "shm"
    ttl_s: int = 3
    exchange_timeout_s: float = 2.0
    max_tokens_per_step: int = 64
    max_num_seqs: int = 256  # sequences one rank decodes at once; the rest wait on the rank
    kv_blocks: int = 256
    block_size: int = 16
    model_name: str = "eep"
    elastic: bool = True  # False: the fixed-membership baseline
    fabric_store: str = ""  # host:port of the TCP store the nccl fabric rendezvous at
    # decode steps padded, replayed from CUDA graphs (symm on GPU); eep launch --device cuda
    # turns it on unless --no-cuda-graphs
    cuda_graphs: bool = False
    # fault-injection hook, off (0) in service: a worker's first pull of its experts, once
    # planned, is held open this long before any byte moves, so `eep bench chaos` can kill
    # the rejoining worker or one of its sources mid-pull (the tiny model's pull takes ms)
    pull_hold_s: float = 0.0

    def __post_init__(self) -> None:
        if self.num_slots < 1 or self.experts_per_slot < 1:
            raise ValueError(
                f"num_slots ({self.num_slots}) and experts_per_slot ({self.experts_per_slot}) "
                "must be >= 1."
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} must be one of {_DTYPES}.")
        if self.fabric not in _FABRICS:
            raise ValueError(f"fabric {self.fabric!r} must be one of {_FABRICS}.")
        if self.ttl_s < 1 or self.exchange_timeout_s <= 0:
            raise ValueError("ttl_s must be >= 1 and exchange_timeout_s > 0.")
        if self.max_tokens_per_step < 1 or self.kv_blocks < 1 or self.block_size < 1:
            raise ValueError("max_tokens_per_step, kv_blocks and block_size must be >= 1.")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if not self.pull_hold_s >= 0:
            raise ValueError(
                f"pull_hold_s must be >= 0 s (0 turns the fault-injection hold off), got "
                f"{self.pull_hold_s!r}."
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> RuntimeConfig:
        obj = json.loads(raw)
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"runtime config has unknown fields {sorted(unknown)}.")
        return cls(**obj)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)
