"""The one configuration of the EP kernels: sizes fixed when the fabric buffers are allocated.

Glossary (docs/design.md, section 3): a **slot** is an EP position (one GPU, one rank of the
fabric); a **logical expert** ``e`` is in ``[0, num_experts)``; a **physical expert** ``p`` is one
replica of a logical expert and lives on slot ``p // experts_per_slot`` as **local expert**
``p % experts_per_slot``. The view reaches the kernels only as int32 device tensors
(``rank_mask``, ``log2phy``, ``replica_count``, ``epoch``), updated in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True, slots=True)
class EpConfig:
    """Sizes and behaviour of one EP fabric over ``num_slots`` ranks of one host.

    ``max_tokens`` bounds the tokens one rank dispatches in one step; every receive buffer is
    sized from it once. ``exchange_timeout_s`` (seconds) bounds each wait on a peer's flag; it
    has no default here: the runtime's configuration (``RuntimeConfig.exchange_timeout_s``) or a
    bench's own option gives it. ``elastic=False`` turns the elastic checks (rank mask, epoch,
    timeout) off; it exists to measure their cost.
    """

    num_slots: int
    experts_per_slot: int
    hidden: int
    topk: int
    max_tokens: int
    dtype: torch.dtype
    exchange_timeout_s: float
    elastic: bool = True

    def __post_init__(self) -> None:
        for name in ("num_slots", "experts_per_slot", "hidden", "topk", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EpConfig.{name} must be a positive int, got {value!r}.")
        if self.num_slots > 64:
            raise ValueError(f"EpConfig.num_slots is at most 64 on one host, got {self.num_slots}.")
        if self.topk > self.num_physical_experts:
            raise ValueError(
                f"EpConfig.topk={self.topk} exceeds the {self.num_physical_experts} physical "
                "experts; lower topk or add slots."
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"EpConfig.dtype must be one of {_DTYPES}, got {self.dtype}.")
        t = self.exchange_timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < math.inf:
            raise ValueError(
                f"EpConfig.exchange_timeout_s must be a positive number of seconds, got {t!r}."
            )

    @property
    def num_physical_experts(self) -> int:
        return self.num_slots * self.experts_per_slot

    @property
    def recv_rows_per_expert(self) -> int:
        """Rows of one local expert's receive region: ``max_tokens`` from each slot."""
        return self.num_slots * self.max_tokens
