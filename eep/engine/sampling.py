"""Token sampling that depends only on the request and the token's index.

Greedy when ``temperature == 0``. Otherwise the token at output position ``index`` is drawn
by inverting the cumulative distribution (temperature, then ``top_k``, then ``top_p``) at one
uniform number from a generator seeded by ``(seed, index)`` alone: not by the batch the
request is in, the rank it runs on, or how many tokens other requests drew before it. A
request re-queued onto another rank after a failure (it arrives with the tokens it already
emitted, ``Submit.emitted``) therefore draws exactly the tokens it would have drawn.
"""

from __future__ import annotations

import torch

from eep.protocol import SamplingParams

__all__ = ["SamplingParams", "draw_seed", "sample"]

_MASK = (1 << 63) - 1
# below this temperature the softmax overflows (5e-324 gave NaNs and killed a rank): greedy
GREEDY_BELOW = 1e-5


def draw_seed(seed: int, index: int) -> int:
    """The generator seed of output position ``index`` of a request seeded ``seed``."""
    return (seed * 1_000_003 + index) & _MASK


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """One token from ``logits`` ``[vocab]`` (any float dtype) for output position ``index``."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # an overflow no valid input should reach
        return int(torch.argmax(logits))
    # stable: tokens of equal probability keep their vocabulary order, on every rank
    sorted_p, order = torch.sort(probs, descending=True, stable=True)
    if 0 < params.top_k < sorted_p.numel():
        sorted_p = sorted_p[: params.top_k]
    if params.top_p < 1:
        # the smallest head whose mass reaches top_p (the most likely token always stays)
        keep = int((torch.cumsum(sorted_p, 0) - sorted_p < params.top_p).sum())
        sorted_p = sorted_p[: max(keep, 1)]
    cdf = torch.cumsum(sorted_p, 0)
    gen = torch.Generator().manual_seed(draw_seed(params.seed, index))
    u = torch.rand((), generator=gen, dtype=torch.float64) * cdf[-1].cpu()
    pick = int(torch.searchsorted(cdf.cpu(), u.reshape(1), right=True))
    return int(order[min(pick, cdf.numel() - 1)])
