"""The committed view as the kernels see it: int32 device tensors, updated in place.

Captured CUDA graphs hold these tensors' addresses, so a new view is applied by copying into
them (``DeviceView.update_``), never by replacing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceView:
    """``rank_mask`` ``[num_slots]`` int32 (1 = live); ``log2phy`` ``[num_experts, max_replicas]``
    int32 physical expert ids, ``-1`` padding; ``replica_count`` ``[num_experts]`` int32;
    ``epoch`` ``[1]`` int32. Physical expert ``p`` lives on slot ``p // experts_per_slot``."""

    rank_mask: torch.Tensor
    log2phy: torch.Tensor
    replica_count: torch.Tensor
    epoch: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("rank_mask", "log2phy", "replica_count", "epoch"):
            t = getattr(self, name)
            if t.dtype != torch.int32 or not t.is_contiguous():
                raise ValueError(f"DeviceView.{name} must be a contiguous int32 tensor, got {t}.")
        if self.log2phy.dim() != 2 or self.replica_count.shape != self.log2phy.shape[:1]:
            raise ValueError(
                f"DeviceView.log2phy {tuple(self.log2phy.shape)} and replica_count "
                f"{tuple(self.replica_count.shape)} must be [E, R] and [E]."
            )
        if self.epoch.numel() != 1:
            raise ValueError(f"DeviceView.epoch must hold one value, got {self.epoch.numel()}.")

    @classmethod
    def create(
        cls,
        rank_mask: torch.Tensor,
        log2phy: torch.Tensor,
        replica_count: torch.Tensor,
        epoch: int,
        device: torch.device | str,
    ) -> DeviceView:
        """Copies host tensors onto ``device`` as the view's long-lived buffers."""
        as_i32 = lambda t: torch.as_tensor(t, dtype=torch.int32).contiguous().to(device)
        return cls(as_i32(rank_mask), as_i32(log2phy), as_i32(replica_count), as_i32([epoch]))

    @property
    def num_slots(self) -> int:
        return self.rank_mask.shape[0]

    def update_(
        self,
        rank_mask: torch.Tensor,
        log2phy: torch.Tensor,
        replica_count: torch.Tensor,
        epoch: int | torch.Tensor,
    ) -> None:
        """Applies a new view in place (stream-ordered, no host sync); shapes must not change."""
        self.rank_mask.copy_(torch.as_tensor(rank_mask, dtype=torch.int32), non_blocking=True)
        self.log2phy.copy_(torch.as_tensor(log2phy, dtype=torch.int32), non_blocking=True)
        self.replica_count.copy_(
            torch.as_tensor(replica_count, dtype=torch.int32), non_blocking=True
        )
        self.epoch.copy_(torch.as_tensor(epoch, dtype=torch.int32).reshape(1), non_blocking=True)
