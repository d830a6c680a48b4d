"""The one configuration of the transfer service, built once at the entry point."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

PROTOCOLS = ("tcp", "rdma", "nvlink_intra", "cuda_ipc")
GPU_PROTOCOLS = ("nvlink_intra", "cuda_ipc")  # device memory to device memory within a host
P2P_HANDSHAKE = "P2PHANDSHAKE"
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """How this process moves bytes to and from its peers.

    ``protocol``: ``tcp`` (anywhere), ``rdma`` (across hosts with NICs), ``nvlink_intra``
    (Mooncake's intra-host NVLink transport) or ``cuda_ipc`` (this package's own intra-host
    path: CUDA IPC handles published in the manifest, copies on the copy engines).
    ``metadata``: ``P2PHANDSHAKE`` (peers exchange segment metadata on first contact) or the
    cluster's etcd as ``host:port``. ``hostname``: the address peers reach this engine at.
    ``host_id``: the machine's identity, compared to prefer same-host sources.

    Deadlines: connecting to a peer is bounded by ``connect_timeout_s``; one request of
    ``n`` bytes by ``op_timeout_s + n / min_bytes_per_s``; a whole pull by ``pull_timeout_s``.
    ``engine_timeout_s`` is the engine's own bound for its synchronous calls (Mooncake's
    ``MC_TRANSFER_TIMEOUT``; it accepts no less than 5 s). ``engine_env``: extra Mooncake
    variables applied last (an empty value unsets one); for diagnosis and tuning.

    Requests: a pull sends requests of up to ``chunk_nbytes``, ``max_inflight`` at a time per
    holder; 0 (the default) picks by protocol: 256 MiB x 8 between GPUs (``cuda_ipc``,
    ``nvlink_intra``: a 16 MiB request lasts 50 us at 300 GB/s, shorter than one turn of the
    executor's loop), 16 MiB x 4 otherwise. ``verify_workers``: threads verifying checksums,
    each one batch of landed tensors at a time.
    """

    protocol: str = "tcp"
    metadata: str = P2P_HANDSHAKE
    hostname: str = "127.0.0.1"
    host_id: str = field(default_factory=socket.gethostname)
    device_name: str = ""
    connect_timeout_s: float = 2.0
    op_timeout_s: float = 5.0
    min_bytes_per_s: float = 50e6
    pull_timeout_s: float = 600.0
    engine_timeout_s: int = 10
    chunk_nbytes: int = 0
    max_inflight: int = 0
    remote_weight: float = 0.25
    verify_workers: int = 2
    engine_env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}: use tcp "
                "anywhere, rdma across hosts with NICs, nvlink_intra or cuda_ipc within a host."
            )
        gpu = self.protocol in GPU_PROTOCOLS
        if self.chunk_nbytes == 0:
            object.__setattr__(self, "chunk_nbytes", (256 if gpu else 16) * MiB)
        if self.max_inflight == 0:
            object.__setattr__(self, "max_inflight", 8 if gpu else 4)
        if not self.metadata:
            raise ValueError("metadata must be 'P2PHANDSHAKE' or the etcd endpoint host:port.")
        if not self.hostname:
            raise ValueError("hostname (the address peers reach this engine at) is empty.")
        for name in ("connect_timeout_s", "op_timeout_s", "pull_timeout_s", "min_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.engine_timeout_s < 5:
            raise ValueError(
                f"engine_timeout_s={self.engine_timeout_s}: Mooncake accepts no less than 5 s."
            )
        if self.chunk_nbytes < 4096 or self.chunk_nbytes % 4096:
            raise ValueError(
                f"chunk_nbytes={self.chunk_nbytes} must be a positive multiple of 4096."
            )
        if self.max_inflight < 1 or self.verify_workers < 1:
            raise ValueError("max_inflight and verify_workers must be at least 1.")
        if not 0 < self.remote_weight <= 1:
            raise ValueError(
                f"remote_weight={self.remote_weight} must be in (0, 1]: the bandwidth of a "
                "cross-host source relative to a same-host one."
            )

    @property
    def metadata_url(self) -> str:
        """The metadata string Mooncake expects (``etcd://`` added to a bare endpoint)."""
        if self.metadata == P2P_HANDSHAKE or "://" in self.metadata:
            return self.metadata
        return f"etcd://{self.metadata}"

    def deadline_s(self, nbytes: int) -> float:
        """Seconds one request of ``nbytes`` may take before its source counts as hung."""
        return self.op_timeout_s + nbytes / self.min_bytes_per_s
