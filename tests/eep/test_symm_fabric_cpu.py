"""The symm fabric's adapter code on the CPU (Triton interpreter): one slot exchanging with
itself over a host buffer runs every line ``run_moe``/``end_step``/``apply_view``/``warm_up``
run on GPUs, where the peers' buffers come from CUDA IPC instead."""

from __future__ import annotations

import pytest
import torch

from eep.fabrics.base import ExchangeFailed, FabricConfig, FailureReason

HIDDEN, INTER, EPS, TOPK, CAP = 32, 16, 4, 2, 8


def _fabric(num_slots: int = 1, peer_info=lambda slot, inc: None):
    from eep.fabrics.symm import SymmFabric, device_view_for
    from eep.kernels.config import EpConfig
    from eep.kernels.fabric import EpFabric, FabricLayout

    cfg = FabricConfig(num_slots, EPS, HIDDEN, TOPK, CAP, torch.float32, exchange_timeout_s=1e-3)
    ep = EpConfig(num_slots, EPS, HIDDEN, TOPK, CAP, torch.float32, exchange_timeout_s=1e-3)
    view = device_view_for(num_slots, "cpu")
    buf = torch.zeros(FabricLayout.for_config(ep).nbytes, dtype=torch.uint8)
    peer_base = torch.zeros(num_slots, dtype=torch.int64)
    peer_base[0] = buf.data_ptr()
    host = EpFabric(ep, 0, view, buf, peer_base)
    return SymmFabric(0, cfg, view, peer_info=peer_info, device="cpu", buffer=host)


def _moe():
    from eep.model.moe import MoEBlock, SoftmaxTopKRouter

    gen = torch.Generator().manual_seed(0)
    moe = MoEBlock(SoftmaxTopKRouter(HIDDEN, EPS, TOPK, True), HIDDEN, INTER, EPS, range(EPS))
    moe.w_gate_up.copy_(torch.randn(EPS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5)
    moe.w_down.copy_(torch.randn(EPS, HIDDEN, INTER, generator=gen) / INTER**0.5)
    return moe


def test_run_moe_equals_run_experts_grouped_and_the_step_is_valid():
    from eep.engine.moe_exec import run_experts_grouped
    from eep.kernels.experts import weighted_sum

    fabric, moe = _fabric(), _moe()
    fabric.warm_up()
    assert fabric.view.rank_mask.tolist() == [0] and fabric.view.epoch.item() == 0
    fabric.apply_view(1, {0: 1})
    gen = torch.Generator().manual_seed(1)
    for tokens in (CAP, 1, 0, 5):
        x = torch.randn(tokens, HIDDEN, generator=gen)
        ids = torch.randint(0, EPS, (tokens, TOPK), generator=gen)
        ids[:, 1] = (ids[:, 0] + 1) % EPS  # distinct experts per token
        w = torch.rand(tokens, TOPK, generator=gen)
        got = fabric.run_moe(moe, x, ids.to(torch.int32), w)
        fabric.end_step()
        rows = torch.arange(tokens).repeat_interleave(TOPK)
        want = weighted_sum(run_experts_grouped(moe, x[rows], ids.reshape(-1)), w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert fabric.buf.step_status.item() == 0


def test_a_member_without_a_published_buffer_is_left_out_of_the_mask():
    asked = []
    fabric = _fabric(2, peer_info=lambda slot, inc: asked.append((slot, inc)))
    fabric.apply_view(3, {0: 1, 1: 5})
    assert asked == [(1, 5)]
    assert fabric.members == (0,) and fabric.view.rank_mask.tolist() == [1, 0]
    assert fabric.view.epoch.item() == 3
    with pytest.raises(ValueError, match="another incarnation"):
        fabric.apply_view(4, {0: 2, 1: 5})
    with pytest.raises(ValueError, match="does not include"):
        fabric.apply_view(4, {1: 5})


def test_end_step_raises_once_for_a_failed_step_and_resets():
    fabric = _fabric(2)
    fabric.apply_view(1, {0: 1})
    fabric.buf.step_status.fill_(1)
    fabric.buf.step_suspects[1] = 1
    with pytest.raises(ExchangeFailed) as err:
        fabric.end_step()
    assert err.value.reason is FailureReason.TIMEOUT and err.value.suspects == (1,)
    fabric.end_step()  # reset: the next step starts clean
    fabric.buf.step_status.fill_(2)
    with pytest.raises(ExchangeFailed) as err:
        fabric.end_step()
    assert err.value.reason is FailureReason.NEWER_EPOCH


def test_exports_exchanged_through_a_directory_name_their_incarnation(tmp_path):
    from eep.fabrics.base import peer_info_from_dir, publish_to_dir

    find = peer_info_from_dir(str(tmp_path), "c")
    assert find(1, 1) is None
    publish_to_dir(str(tmp_path), "c", 1, 2, {"handle": "ab", "nbytes": 8, "pid": 7})
    assert find(1, 2) == {"incarnation": 2, "handle": "ab", "nbytes": 8, "pid": 7}
    assert find(1, 1) is None and find(0, 2) is None
