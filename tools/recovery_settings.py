"""The recovery bench's settings: every default resolved, validated once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass

from eep.config import default_fabric

# elastic: a warm standby worker per slot is promoted when its worker dies; elastic-cold: the
# same with standbys off (a new worker process starts from nothing); baseline: full restart
MODES = ("elastic", "elastic-cold", "baseline")


@dataclass(frozen=True)
class BenchSettings:
    """Every resolved setting of the bench (what the JSON records as ``resolved``)."""

    model_path: str
    dtype: str
    device: str
    num_slots: int
    max_num_seqs: int
    max_tokens: int
    ttl_s: int
    exchange_timeout_s: float
    cuda_graphs: bool
    standby_stage: bool  # the warm standbys (elastic runs) stage their ranks ahead
    fault: str  # "kill" | "stop"
    failed_slots: tuple[int, ...]
    stagger_s: float
    load: str  # "open" | "closed"
    streams: int  # closed loop: streams held
    load_factor: float  # open loop: offered / measured capacity
    rate: float | None  # open loop: requests/s given, instead of the capacity run
    capacity_streams: int
    capacity_s: float
    capacity_warmup_s: float
    warmup_s: float
    at_s: float
    duration_s: float
    tail_s: float
    bin_s: float
    window_s: float

    def __post_init__(self) -> None:
        if self.num_slots < 2:
            raise ValueError(f"--slots {self.num_slots}: a slot can fail only among >= 2.")
        if (
            not all(0 <= s < self.num_slots for s in self.failed_slots)
            or len(self.failed_slots) >= self.num_slots
        ):
            raise ValueError(
                f"--slot {_slots_text(self.failed_slots)} must name fewer than all of the "
                f"{self.num_slots} slots (0..{self.num_slots - 1})."
            )
        if not 0 < self.load_factor <= 1:
            raise ValueError(
                f"--load-factor {self.load_factor} must be in (0, 1]: above 1 the queue grows "
                "without bound before the fault."
            )
        positive = {"--max-num-seqs": self.max_num_seqs, "--max-tokens": self.max_tokens}
        positive |= {"--streams": self.streams, "--capacity-streams": self.capacity_streams}
        positive |= {"--bin": self.bin_s, "--capacity-s": self.capacity_s, "--at": self.at_s}
        positive |= {"--duration": self.duration_s}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}.")
        for name, value in {"--warmup": self.warmup_s, "--tail": self.tail_s}.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if self.window_s < self.bin_s:
            raise ValueError(f"--window {self.window_s} must be at least one --bin {self.bin_s}.")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--rate {self.rate} must be > 0 requests/s.")

    @property
    def survivors_frac(self) -> float:
        """The share of the slots left while the failed ones are out."""
        return (self.num_slots - len(self.failed_slots)) / self.num_slots

    def fabric(self, mode: str) -> str:
        """CPU: shm in both modes; GPU: the Triton kernels (symm), the baseline on NCCL."""
        return default_fabric(self.device, baseline=mode == "baseline")


def _slots_text(slots) -> str:
    return ",".join(str(s) for s in slots)
