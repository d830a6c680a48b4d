"""Token sampling that depends only on the request and the token's index.

Greedy when ``temperature == 0``; otherwise a generator seeded from ``(seed, index)``, so a
request re-run on another rank (after a failure) draws exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """One token from ``logits`` ``[vocab]`` fp32 for output position ``index``."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    gen = torch.Generator().manual_seed((params.seed * 1_000_003 + index) & _MASK)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
