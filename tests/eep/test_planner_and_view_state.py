"""The coordinator's planner over views, and the view as the data plane holds it."""

from __future__ import annotations

import torch

from eep.config import RuntimeConfig
from eep.membership.registry import SlotRecord, SlotState
from eep.membership.suspicion import resync_requests
from eep.membership.view import View
from eep.placement import Placement
from eep.planner import home_placement, next_placement
from eep.view_state import ViewState


def _cfg(slots=4, eps=4) -> RuntimeConfig:
    return RuntimeConfig(cluster="t", model_path="/m", num_slots=slots, experts_per_slot=eps)


def _view(epoch, members, placement):
    return View(epoch, tuple(members), tuple((s, 1) for s in members), placement)


def test_the_planner_repairs_on_failure_and_restores_home_on_return():
    home = home_placement(_cfg(), num_experts=8)
    first = next_placement(home, [0, 1, 2, 3], None)
    assert Placement.from_json(first).phy2log == home.phy2log
    after = Placement.from_json(next_placement(home, [0, 1, 3], _view(1, [0, 1, 2, 3], first)))
    assert after.live == (0, 1, 3) and after.orphans == ()
    assert all(after.slot_experts(s) == home.slot_experts(s) for s in (0, 1, 3))
    back = next_placement(home, [0, 1, 2, 3], _view(2, [0, 1, 3], after.to_json()))
    assert Placement.from_json(back).phy2log == home.phy2log


def test_view_state_updates_its_tensors_in_place():
    home = home_placement(_cfg(), num_experts=8)
    state = ViewState(4, 4, 8, home.max_replicas)
    tensors = (state.rank_mask, state.log2phy, state.replica_count, state.device_view.epoch)
    addresses = [t.data_ptr() for t in tensors]
    state.apply(_view(1, [0, 1, 2, 3], next_placement(home, [0, 1, 2, 3], None)))
    assert state.rank_mask.tolist() == [1, 1, 1, 1] and int(state.device_view.epoch) == 1
    placement = next_placement(home, [0, 2, 3], _view(1, [0, 1, 2, 3], home.to_json()))
    state.apply(_view(2, [0, 2, 3], placement))
    assert state.rank_mask.tolist() == [1, 0, 1, 1]
    assert [t.data_ptr() for t in tensors] == addresses
    expected = torch.tensor(Placement.from_json(placement).log2phy, dtype=torch.int32)
    assert torch.equal(state.log2phy, expected)
    assert state.local_experts(2) == home.slot_experts(2)


def test_a_member_that_asks_for_a_resync_gets_one_once():
    view = View(5, (0, 1), ((0, 1), (1, 1)))
    ask = SlotRecord(1, 1, 10, "h", "cpu", 7, SlotState.READY, resync_epoch=5)
    old = SlotRecord(0, 1, 11, "h", "cpu", 8, SlotState.READY, resync_epoch=4)
    assert resync_requests(view, {0: old, 1: ask}) == [1]
    assert resync_requests(View(6, (0, 1), ((0, 1), (1, 1))), {0: old, 1: ask}) == []
