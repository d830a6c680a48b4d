"""GPU tests of the EP kernels (run on the lent machine; CI has no GPU and skips them)."""

from __future__ import annotations

import pytest
import torch

from eep.kernels import reference as ref
from eep.kernels.ep_comm_kernels import STATUS_TIMEOUT

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _need_gpus(n: int):
    return pytest.mark.skipif(NUM_GPUS < n, reason=f"needs {n} CUDA GPUs, found {NUM_GPUS}")


@pytest.mark.gpu
@_need_gpus(1)
@pytest.mark.parametrize(
    "groups_per_expert,cap,counts", [(1, 512, [512, 300, 0, 77]), (4, 8, [3] * 16)]
)
def test_grouped_swiglu_bf16_matches_reference_on_gpu(groups_per_expert, cap, counts):
    from eep.kernels.grouped_gemm import grouped_swiglu

    gen = torch.Generator().manual_seed(len(counts))
    hidden, inter = 1024, 384
    experts = len(counts) // groups_per_expert
    x = torch.randn(len(counts), cap, hidden, generator=gen).bfloat16()
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).bfloat16()
    group_m = torch.tensor(counts, dtype=torch.int32)
    out = torch.full_like(x, float("nan"), device="cuda")
    got = grouped_swiglu(
        x.cuda(),
        group_m.cuda(),
        w13.cuda(),
        w2.cuda(),
        groups_per_expert=groups_per_expert,
        out=out,
    ).cpu()
    want = ref.grouped_swiglu_ref(x, group_m, w13, w2, groups_per_expert)
    for g, n in enumerate(counts):
        assert torch.isnan(got[g, n:].float()).all()
        if n:
            err = (got[g, :n].double() - want[g, :n].double()).norm() / want[g, :n].double().norm()
            assert err < 1e-2, f"group {g}: relative error {err:.3g}"


@pytest.mark.multigpu
@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_and_combine_equal_the_reference_exactly(world):
    if NUM_GPUS < world:
        pytest.skip(f"needs {world} CUDA GPUs, found {NUM_GPUS}")
    from _gpu_workers import exchange_worker
    from _mp import run_ranks

    decode = [[1, 128, 0, 77][:world], [256, 3, 64, 1][:world]]
    prefill = [[2048, 1500, 2048, 9][:world]]
    for hidden, cap, steps in ((7168, 256, decode), (2048, 2048, prefill)):
        results = run_ranks(
            exchange_worker, world, 240, hidden=hidden, max_tokens=cap, tokens=steps
        )
        for rank, res in enumerate(results):
            assert res is not None, f"rank {rank} did not finish"
            assert res["errors"] == [], f"rank {rank}: {res['errors']}"
            assert res["step"] == len(steps)


@pytest.mark.multigpu
@_need_gpus(4)
def test_survivors_flag_a_sigkilled_peer_within_the_timeout_and_keep_exchanging():
    from _gpu_workers import kill_worker
    from _mp import run_ranks

    world, victim, exchange_timeout_s = 4, 3, 0.3
    results = run_ranks(
        kill_worker, world, 240, victim=victim, exchange_timeout_s=exchange_timeout_s
    )
    assert results[victim] is None
    for rank in range(world - 1):
        res = results[rank]
        assert res is not None, f"survivor {rank} hung or died"
        assert res["suspect"] == [0, 0, 0, 1], res
        assert res["status"] & STATUS_TIMEOUT, res
        # bounded: the timeout plus launch and host overhead, far from a hang
        assert res["straddling_s"] < exchange_timeout_s + 2.0, res
        assert res["errors"] == [], f"survivor {rank}: {res['errors']}"


@pytest.mark.multigpu
@_need_gpus(4)
def test_one_cuda_graph_follows_a_view_changed_in_place():
    from _gpu_workers import graph_worker
    from _mp import run_ranks

    results = run_ranks(graph_worker, 4, 240)
    for rank, res in enumerate(results):
        assert res is not None, f"rank {rank} did not finish"
        assert res["errors"] == [], f"rank {rank}: {res['errors']} {res['results']}"
        assert "view1" in res["results"]
        assert ("view2" in res["results"]) == (rank != 3)
