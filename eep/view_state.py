"""The committed view as the data plane holds it: tensors allocated once, updated in place.

Captured CUDA graphs and running kernels hold the addresses of ``rank_mask``, ``log2phy``,
``replica_count`` and ``epoch`` (``eep.kernels.view.DeviceView``), so a new view is copied into
them at a step boundary, never re-allocated. Shapes are fixed by the cluster's configuration:
``[num_slots]``, ``[num_experts, max_replicas]``, ``[num_experts]``, ``[1]``.
"""

from __future__ import annotations

import torch

from eep.kernels.view import DeviceView
from eep.membership.view import View
from eep.placement import Placement


class ViewState:
    def __init__(
        self,
        num_slots: int,
        experts_per_slot: int,
        num_experts: int,
        max_replicas: int,
        device: torch.device | str = "cpu",
    ):
        self.num_slots, self.experts_per_slot = num_slots, experts_per_slot
        self.max_replicas = max_replicas
        self.device_view = DeviceView.create(
            torch.zeros(num_slots),
            torch.full((num_experts, max_replicas), -1),
            torch.zeros(num_experts),
            0,
            device,
        )
        self.epoch = 0
        self.members: dict[int, int] = {}
        self.placement: Placement | None = None

    @property
    def rank_mask(self) -> torch.Tensor:
        return self.device_view.rank_mask

    @property
    def log2phy(self) -> torch.Tensor:
        return self.device_view.log2phy

    @property
    def replica_count(self) -> torch.Tensor:
        return self.device_view.replica_count

    def apply(self, view: View) -> None:
        """Copy ``view`` into the tensors (stream-ordered on a GPU; no reallocation)."""
        if view.placement is None:
            raise ValueError(
                f"view {view.epoch} carries no placement; is the coordinator "
                "running with the runtime's planner?"
            )
        placement = Placement.from_json(view.placement)
        mask = torch.zeros(self.num_slots, dtype=torch.int32)
        mask[list(view.members)] = 1
        log2phy = torch.full(tuple(self.log2phy.shape), -1, dtype=torch.int32)
        table = torch.as_tensor(placement.log2phy, dtype=torch.int32)
        log2phy[:, : table.shape[1]] = table[:, : self.max_replicas]
        count = torch.as_tensor(placement.replica_count, dtype=torch.int32)
        self.device_view.update_(mask, log2phy, count.clamp(max=self.max_replicas), view.epoch)
        self.epoch, self.members, self.placement = view.epoch, dict(view.incarnations), placement

    def local_experts(self, slot: int) -> tuple[int, ...]:
        """The logical experts of ``slot``'s physical experts in the current placement."""
        assert self.placement is not None
        eps = self.experts_per_slot
        return tuple(self.placement.phy2log[slot * eps : (slot + 1) * eps])
