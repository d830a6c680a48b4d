"""The math every path that runs experts shares, whichever fabric moved the rows.

``weighted_sum`` combines the top-k outputs of a token in ``k`` order; ``expert_tiles`` is the
one tile shape of the grouped expert GEMM on CUDA. The engine's local path and every fabric
(``eep.fabrics``) use both, so a token's result does not depend on where its experts ran.
"""

from __future__ import annotations

import torch


def weighted_sum(per_k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``per_k`` ``[T * K, H]`` expert outputs, ``weights`` ``[T, K]`` -> ``[T, H]``."""
    k = weights.shape[1]
    return (per_k.view(-1, k, per_k.shape[-1]) * weights.to(per_k.dtype).unsqueeze(-1)).sum(1)


def expert_tiles():
    """The grouped GEMM's tiles for every expert MLP on CUDA, whatever the batch: one tile
    shape means one reduction order per row, so a row's result does not depend on how many
    rows ran beside it or on which path (fabric buffer or the engine's ``run_experts``) ran
    it."""
    from eep.kernels.grouped_gemm import DECODE_TILES  # defines Triton kernels: import on use

    return DECODE_TILES
