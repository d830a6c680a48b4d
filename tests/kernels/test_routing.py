"""Routing kernel against ``reference.route_ref`` (CPU: Triton interpreter)."""

from __future__ import annotations

import pytest
import torch
from _placement import random_placement

from eep.kernels import reference as ref
from eep.kernels.routing import RoutingResult, map_to_physical, route
from eep.kernels.view import DeviceView

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOTS, PER_SLOT, EXPERTS = 4, 8, 24


def _poisoned(num_tokens: int, topk: int) -> RoutingResult:
    shape = (num_tokens, topk)
    return RoutingResult(
        torch.full(shape, -7, dtype=torch.int32, device=DEVICE),
        torch.full(shape, float("nan"), device=DEVICE),
        torch.full(shape, -7, dtype=torch.int32, device=DEVICE),
    )


def _check(logits, log2phy, count, mask, topk, elastic=True, renormalize=True, offset=0):
    view = DeviceView.create(mask, log2phy, count, 0, DEVICE)
    got = route(
        logits.to(DEVICE),
        view,
        topk=topk,
        experts_per_slot=PER_SLOT,
        spread_offset=offset,
        renormalize=renormalize,
        elastic=elastic,
        out=_poisoned(logits.shape[0], topk),
    )
    want = ref.route_ref(
        logits,
        log2phy,
        count,
        mask,
        topk=topk,
        experts_per_slot=PER_SLOT,
        spread_offset=offset,
        renormalize=renormalize,
        elastic=elastic,
    )
    assert torch.equal(got.topk_idx.cpu(), want.topk_idx)
    assert torch.equal(got.topk_phy.cpu(), want.topk_phy)
    torch.testing.assert_close(got.topk_weights.cpu(), want.topk_weights, rtol=1e-5, atol=1e-6)
    return got


@pytest.mark.parametrize("num_tokens", [0, 1, 37])
@pytest.mark.parametrize("elastic", [True, False])
def test_route_matches_reference_on_random_views(num_tokens, elastic):
    gen = torch.Generator().manual_seed(100 + num_tokens)
    log2phy, count = random_placement(SLOTS, PER_SLOT, EXPERTS, gen)
    assert set(count.tolist()) == {1, 2, 3}
    logits = torch.randn(num_tokens, EXPERTS, generator=gen)
    mask = torch.ones(SLOTS, dtype=torch.int32)
    _check(logits, log2phy, count, mask, topk=6, elastic=elastic, offset=num_tokens)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_never_picks_a_masked_slot_and_drops_orphans(renormalize):
    gen = torch.Generator().manual_seed(7)
    log2phy, count = random_placement(SLOTS, PER_SLOT, EXPERTS, gen)
    logits = torch.randn(29, EXPERTS, generator=gen)
    mask = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    got = _check(logits, log2phy, count, mask, topk=8, renormalize=renormalize, offset=3)
    phy = got.topk_phy.cpu()
    live = phy[phy >= 0]
    assert mask[live // PER_SLOT].all()
    # an entry is dropped exactly when its expert has no replica on a live slot
    hosts = [{int(p) // PER_SLOT for p in log2phy[e, : count[e]]} for e in range(EXPERTS)]
    orphan = torch.tensor([not any(mask[s] for s in h) for h in hosts])
    assert torch.equal(phy < 0, orphan[got.topk_idx.cpu().long()])


def test_route_spreads_tokens_over_live_replicas():
    log2phy = torch.tensor([[0, 9, 17], [8, -1, -1], [16, -1, -1]], dtype=torch.int32)
    count = torch.tensor([3, 1, 1], dtype=torch.int32)
    logits = torch.tensor([[5.0, 0.0, -1.0]]).repeat(30, 1)
    for mask, hosts in (([1, 1, 1, 1], {0, 9, 17}), ([1, 0, 1, 1], {0, 17})):
        mask = torch.tensor(mask, dtype=torch.int32)
        got = _check(logits, log2phy, count, mask, topk=2)
        first = got.topk_phy[:, 0].cpu()
        per_replica = torch.bincount(first, minlength=18)[sorted(hosts)]
        assert set(first.tolist()) == hosts
        assert per_replica.max() - per_replica.min() <= 1


def test_map_to_physical_matches_reference():
    gen = torch.Generator().manual_seed(11)
    log2phy, count = random_placement(SLOTS, PER_SLOT, EXPERTS, gen)
    mask = torch.tensor([0, 1, 1, 1], dtype=torch.int32)
    topk_idx = torch.stack([torch.randperm(EXPERTS, generator=gen)[:5] for _ in range(21)])
    topk_idx = topk_idx.to(torch.int32)
    view = DeviceView.create(mask, log2phy, count, 0, DEVICE)
    out = torch.full((21, 5), -7, dtype=torch.int32, device=DEVICE)
    got = map_to_physical(
        topk_idx.to(DEVICE), view, experts_per_slot=PER_SLOT, spread_offset=2, out=out
    )
    want = ref.select_replicas_ref(topk_idx, log2phy, count, mask, PER_SLOT, 2)
    assert torch.equal(got.cpu(), want)
