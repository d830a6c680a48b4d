"""What every fabric shares: its configuration and how an exchange fails."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class FailureReason(enum.Enum):
    TIMEOUT = "timeout"  # a live-marked sender never arrived within the bounded wait
    NEWER_EPOCH = "newer_epoch"  # a peer (or the local watcher) is already in a newer view
    TORN = "torn"  # a mailbox was overwritten while being read (the sender moved on)


class ExchangeFailed(Exception):
    """The step's exchange did not complete; the step is discarded and re-run after a view.

    ``suspects`` are the slots that did not arrive (TIMEOUT); ``epoch`` is the epoch the
    exchange ran under and ``newer_epoch`` the newer one seen, if any.
    """

    def __init__(
        self,
        reason: FailureReason,
        epoch: int,
        suspects: tuple[int, ...] = (),
        newer_epoch: int = 0,
    ):
        self.reason, self.epoch = reason, epoch
        self.suspects, self.newer_epoch = suspects, newer_epoch
        detail = f"suspects {list(suspects)}" if suspects else f"newer epoch {newer_epoch}"
        super().__init__(f"exchange in epoch {epoch} failed: {reason.value} ({detail})")


@dataclass(frozen=True, slots=True)
class FabricConfig:
    """Sizes fixed at start-up (buffers are allocated once).

    ``max_tokens``: tokens one rank sends per exchange (the engine's per-step token budget);
    ``timeout_s``: the bounded wait for one sender.
    """

    num_slots: int
    experts_per_slot: int
    hidden: int
    topk: int
    max_tokens: int
    dtype: torch.dtype = torch.float32
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("num_slots", "experts_per_slot", "hidden", "topk", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"FabricConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.timeout_s <= 0:
            raise ValueError(f"FabricConfig.timeout_s must be > 0, got {self.timeout_s}.")

    @property
    def rows_per_sender(self) -> int:
        """Rows one sender may put in one destination's mailbox (all its (t, k) pairs)."""
        return self.max_tokens * self.topk


def make_tag(epoch: int, seq: int) -> int:
    """The flag value of exchange ``seq`` of ``epoch``: epochs order first."""
    return (epoch << 40) | seq


def tag_epoch(tag: int) -> int:
    return tag >> 40
