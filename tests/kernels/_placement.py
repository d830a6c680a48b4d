"""Random placements and views for the kernel tests (no two replicas of one expert per slot)."""

from __future__ import annotations

import torch


def random_placement(
    num_slots: int,
    experts_per_slot: int,
    num_experts: int,
    gen: torch.Generator,
    max_replicas: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log2phy [E, max_replicas], replica_count [E])`` int32; every expert gets 1 to
    ``max_replicas`` replicas on distinct slots while capacity lasts; ``-1`` pads."""
    capacity = num_slots * experts_per_slot
    if num_experts > capacity:
        raise ValueError(f"{num_experts} experts do not fit {capacity} physical slots.")
    next_local = [0] * num_slots
    log2phy = torch.full((num_experts, max_replicas), -1, dtype=torch.int32)
    count = torch.zeros(num_experts, dtype=torch.int32)

    def place(e: int) -> bool:
        hosts = {int(p) // experts_per_slot for p in log2phy[e, : count[e]]}
        free = [s for s in range(num_slots) if next_local[s] < experts_per_slot and s not in hosts]
        if not free:
            return False
        s = free[int(torch.randint(len(free), (1,), generator=gen))]
        log2phy[e, count[e]] = s * experts_per_slot + next_local[s]
        next_local[s] += 1
        count[e] += 1
        return True

    for e in torch.randperm(num_experts, generator=gen).tolist():
        assert place(e)
    for e in torch.randperm(num_experts, generator=gen).tolist():
        want = int(torch.randint(1, max_replicas + 1, (1,), generator=gen))
        while count[e] < min(want, num_slots) and place(e):
            pass
    return log2phy, count
