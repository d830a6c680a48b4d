"""Dispatch/combine protocol with simulated ranks in one process (CPU: interpreter).

Each simulated rank gets its own receive buffer; ``peer_base`` holds their addresses, so the
kernels store into "peers" exactly as on GPUs. Phases run rank by rank: every send of a phase
before any wait, as the real ranks' stream order and flags guarantee.
"""

from __future__ import annotations

import pytest
import torch
from _ep_inputs import make_inputs

from eep.kernels import reference as ref
from eep.kernels.config import EpConfig
from eep.kernels.ep_comm_kernels import STATUS_NEWER_EPOCH, STATUS_TIMEOUT
from eep.kernels.fabric import EpFabric, FabricLayout
from eep.kernels.view import DeviceView

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOTS, PER_SLOT, HIDDEN, TOPK, CAP = 3, 2, 24, 3, 10


def _fabrics(elastic: bool = True, exchange_timeout_s: float = 30e-6) -> list[EpFabric]:
    cfg = EpConfig(
        num_slots=SLOTS,
        experts_per_slot=PER_SLOT,
        hidden=HIDDEN,
        topk=TOPK,
        max_tokens=CAP,
        dtype=torch.float32,
        exchange_timeout_s=exchange_timeout_s,
        elastic=elastic,
    )
    nbytes = FabricLayout.for_config(cfg).nbytes
    bufs = [torch.zeros(nbytes, dtype=torch.uint8, device=DEVICE) for _ in range(SLOTS)]
    peer_base = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEVICE)
    experts = SLOTS * PER_SLOT
    log2phy = torch.arange(experts, dtype=torch.int32)[:, None]
    ones = torch.ones(experts, dtype=torch.int32)
    fabrics = []
    for r in range(SLOTS):
        view = DeviceView.create(torch.ones(SLOTS), log2phy, ones, 5, DEVICE)
        fabrics.append(EpFabric(cfg, r, view, bufs[r], peer_base))
    return fabrics


def _inputs(gen: torch.Generator, tokens: list[int], dead: frozenset[int] = frozenset()):
    seed = int(torch.randint(1 << 30, (1,), generator=gen))
    return make_inputs(seed, tokens, SLOTS, PER_SLOT, HIDDEN, TOPK, torch.float32, dead)


def _run_step(fabrics, xs, phys, ws, ranks):
    dev = lambda t: t.to(DEVICE)
    for f in fabrics:
        f.recv_x.fill_(float("nan"))
    handles = {r: fabrics[r].dispatch_send(dev(xs[r]), dev(phys[r]), dev(ws[r])) for r in ranks}
    recv = {r: fabrics[r].dispatch_recv(handles[r]) for r in ranks}
    ys = {r: recv[r] * 2 + fabrics[r].rank for r in ranks}  # stand-in for the expert MLP
    for r in ranks:
        fabrics[r].combine_send(ys[r], handles[r])
    outs = {}
    for r in ranks:
        poison = torch.full((xs[r].shape[0], HIDDEN), float("nan"), device=DEVICE)
        outs[r] = fabrics[r].combine_recv(handles[r], out=poison).cpu()
    return recv, ys, outs


def _check_step(fabrics, xs, phys, ws, ranks, recv, ys, outs):
    senders = [r in ranks for r in range(SLOTS)]
    want = ref.dispatch_ref(
        xs, phys, ws, experts_per_slot=PER_SLOT, max_tokens=CAP, senders=senders
    )
    for d in ranks:
        f = fabrics[d]
        assert torch.equal(f.recv_m.cpu(), want[d].recv_m)
        for le in range(PER_SLOT):
            for s in ranks:
                rows = slice(s * CAP, s * CAP + int(want[d].recv_m[le, s]))
                assert torch.equal(recv[d][le, rows].cpu(), want[d].recv_x[le, rows])
                assert torch.equal(f.recv_src_idx[le, rows].cpu(), want[d].recv_src_idx[le, rows])
                assert torch.equal(f.recv_weights[le, rows].cpu(), want[d].recv_weights[le, rows])
    slot_ok = torch.tensor(senders)
    y_list = [ys[r].cpu() if r in ys else None for r in range(SLOTS)]
    for s in ranks:
        rows = ref.gather_expert_outputs_ref(y_list, want, s, xs[s].shape[0], TOPK, CAP)
        expect = ref.combine_ref(rows, phys[s], ws[s], slot_ok, PER_SLOT)
        assert torch.equal(outs[s], expect)


@pytest.mark.parametrize("elastic", [True, False])
def test_dispatch_and_combine_equal_the_reference_over_two_steps(elastic):
    gen = torch.Generator().manual_seed(1)
    fabrics = _fabrics(elastic=elastic)
    for tokens in ([7, 0, 10], [10, 3, 1]):
        xs, phys, ws = _inputs(gen, tokens)
        ranks = list(range(SLOTS))
        _check_step(fabrics, xs, phys, ws, ranks, *_run_step(fabrics, xs, phys, ws, ranks))
        for f in fabrics:
            assert f.status.item() == 0 and not f.suspect_mask.any()
    assert [f.step.item() for f in fabrics] == [2] * SLOTS


def test_silent_peer_is_flagged_suspect_then_masked_and_survivors_keep_exchanging():
    gen = torch.Generator().manual_seed(2)
    fabrics = _fabrics(exchange_timeout_s=20e-6)
    survivors = [0, 2]
    xs, phys, ws = _inputs(gen, [6, 5, 4], dead=frozenset({1}))
    for r in survivors:  # slot 1 never sends: it died
        fabrics[r].dispatch_send(xs[r].to(DEVICE), phys[r].to(DEVICE), ws[r].to(DEVICE))
    for r in survivors:
        fabrics[r].dispatch_recv(None)
        assert fabrics[r].suspect_mask.tolist() == [0, 1, 0]
        assert fabrics[r].status.item() == STATUS_TIMEOUT
        assert fabrics[r].recv_m[:, 1].eq(0).all()
    # the committed view drops slot 1 (in place); the next steps are clean and exact
    for r in survivors:
        fabrics[r].view.rank_mask[1] = 0
        fabrics[r].set_step(0)
        assert fabrics[r].step_status.item() == STATUS_TIMEOUT
        assert fabrics[r].step_suspects.tolist() == [0, 1, 0]
        fabrics[r].reset_step_status()
    for _ in range(2):
        xs, phys, ws = _inputs(gen, [6, 5, 4], dead=frozenset({1}))
        _check_step(fabrics, xs, phys, ws, survivors, *_run_step(fabrics, xs, phys, ws, survivors))
        for r in survivors:
            assert fabrics[r].status.item() == 0 and not fabrics[r].suspect_mask.any()


def test_a_slot_that_timed_out_earlier_in_the_step_is_not_waited_for_again():
    gen = torch.Generator().manual_seed(4)
    fabrics = _fabrics(exchange_timeout_s=1e3)  # waiting on slot 1 again would hang the test
    survivors = [0, 2]
    for r in survivors:  # an earlier exchange of this engine step timed out on slot 1
        fabrics[r].step_suspects[1] = 1
        fabrics[r].step_status.fill_(STATUS_TIMEOUT)
    xs, phys, ws = _inputs(gen, [6, 5, 4], dead=frozenset({1}))
    outs = _run_step(fabrics, xs, phys, ws, survivors)
    for r in survivors:
        assert fabrics[r].suspect_mask.tolist() == [0, 1, 0]
        assert fabrics[r].status.item() == 0  # this exchange itself had nothing to wait for
        assert fabrics[r].step_status.item() == STATUS_TIMEOUT  # the step stays invalid
        assert fabrics[r].recv_m[:, 1].eq(0).all()
    _check_step(fabrics, xs, phys, ws, survivors, *outs)


def test_a_newer_epoch_abandons_the_step_without_waiting_for_the_timeout():
    gen = torch.Generator().manual_seed(3)
    fabrics = _fabrics(exchange_timeout_s=1e3)  # a timeout would hang the test
    xs, phys, ws = _inputs(gen, [3, 3, 3])
    fabrics[2].view.epoch.fill_(6)  # slot 2 already applied the next view
    for r in range(SLOTS):
        fabrics[r].dispatch_send(xs[r].to(DEVICE), phys[r].to(DEVICE), ws[r].to(DEVICE))
    fabrics[0].dispatch_recv(None)
    assert fabrics[0].status.item() & STATUS_NEWER_EPOCH
    assert not fabrics[0].suspect_mask.any()
