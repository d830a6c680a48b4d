"""Grouped SwiGLU GEMM against ``reference.grouped_swiglu_ref`` (CPU: interpreter, float32)."""

from __future__ import annotations

import pytest
import torch

from eep.kernels import reference as ref
from eep.kernels.grouped_gemm import grouped_swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize(
    "groups_per_expert,hidden,inter,counts",
    [
        (1, 48, 32, [5, 0, 20, 17]),  # tokens sorted by expert; an empty expert
        (3, 40, 24, [1, 20, 0, 3, 16, 9]),  # the dispatch layout; K tails (40, 24 % 16 != 0)
        (2, 32, 16, [0, 0, 0, 0]),  # zero tokens anywhere
    ],
)
def test_grouped_swiglu_matches_reference(groups_per_expert, hidden, inter, counts):
    gen = torch.Generator().manual_seed(sum(counts) + hidden)
    num_groups, cap = len(counts), 20
    experts = num_groups // groups_per_expert
    x = torch.randn(num_groups, cap, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    group_m = torch.tensor(counts, dtype=torch.int32)
    out = torch.full_like(x, float("nan"), device=DEVICE)
    got = grouped_swiglu(
        x.to(DEVICE),
        group_m.to(DEVICE),
        w13.to(DEVICE),
        w2.to(DEVICE),
        groups_per_expert=groups_per_expert,
        out=out,
    ).cpu()
    want = ref.grouped_swiglu_ref(x, group_m, w13, w2, groups_per_expert)
    for g, n in enumerate(counts):
        assert torch.isnan(got[g, n:]).all(), "rows past group_m must stay untouched"
        if n:
            assert not torch.isnan(got[g, :n]).any()
            assert _rel_err(got[g, :n], want[g, :n]) < 1e-5


def test_grouped_swiglu_reads_strided_rows():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 12, 40, generator=gen)
    x = base[:, :, :32]  # rows strided by 40, last dimension contiguous
    w13 = torch.randn(1, 32, 32, generator=gen) / 32**0.5
    w2 = torch.randn(1, 32, 16, generator=gen) / 4
    group_m = torch.tensor([12, 7], dtype=torch.int32)
    got = grouped_swiglu(
        x.to(DEVICE), group_m.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE), groups_per_expert=2
    ).cpu()
    want = ref.grouped_swiglu_ref(x, group_m, w13, w2, 2)
    assert _rel_err(got[0], want[0]) < 1e-5
    assert _rel_err(got[1, :7], want[1, :7]) < 1e-5
