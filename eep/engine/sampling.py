"""Token sampling that depends only on the request and the token's index.

Greedy when ``temperature == 0``; otherwise a generator seeded from ``(seed, index)``, so a
request re-run on another rank (after a failure) draws exactly the same tokens.
"""

from __future__ import annotations

import torch

from eep.protocol import SamplingParams

__all__ = ["SamplingParams", "sample"]

_MASK = (1 << 63) - 1
# below this temperature the softmax overflows (5e-324 gave NaNs and killed a rank): greedy
GREEDY_BELOW = 1e-5


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """One token from ``logits`` ``[vocab]`` fp32 for output position ``index``."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # an overflow no valid input should reach
        return int(torch.argmax(logits))
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    gen = torch.Generator().manual_seed((params.seed * 1_000_003 + index) & _MASK)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
