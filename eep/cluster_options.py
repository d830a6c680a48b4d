"""What a :class:`~eep.launcher.Cluster` is asked to start (``eep launch``'s options), on one
host or as one host of several."""

from __future__ import annotations

from dataclasses import dataclass

from eep.config import RuntimeConfig


@dataclass
class ClusterOptions:
    runtime: RuntimeConfig
    etcd: str | None = None  # None: start an embedded etcd
    http_port: int = 0
    host: str = "127.0.0.1"  # where the front-end's HTTP and rank ports listen
    torchrun: bool = True
    max_restarts: int = 3  # torchrun's restarts of a supervisor (baseline: of every slot)
    log_dir: str | None = None
    baseline: bool = False  # one torchrun over every slot: a failure restarts them all
    coordinators: int = 2  # a leader and standbys (elected through a lease-bound key)
    standby: bool = True  # each slot keeps a warm standby worker (never in baseline mode)
    # several hosts (one Cluster per host, one etcd for all): the slots this host runs (None:
    # every slot), whether it joins a cluster another host started (no coordinators, no
    # front-end; the runtime config is read from etcd), and this host's identity and address
    slots: tuple[int, ...] | None = None
    join: bool = False
    host_id: str = ""
    address: str = ""

    def __post_init__(self) -> None:
        if self.join and self.etcd is None:
            raise ValueError("join=True needs the cluster's etcd (--etcd host:port[,...]).")
        if self.slots is not None:
            bad = [s for s in self.slots if not 0 <= s < self.runtime.num_slots]
            if bad or len(set(self.slots)) != len(self.slots):
                raise ValueError(
                    f"slots {list(self.slots)} must be distinct slots of 0..."
                    f"{self.runtime.num_slots - 1}."
                )
            if self.baseline:
                raise ValueError("the full-restart baseline runs every slot on one host.")
        if self.address and self.host == "127.0.0.1":
            self.host = self.address  # the front-end listens where the other hosts reach it
        if self.coordinators < 1:
            raise ValueError(f"coordinators must be >= 1, got {self.coordinators}.")
        if self.baseline and not self.torchrun:
            raise ValueError(
                "baseline=True needs torchrun=True: the full-restart baseline is one torchrun "
                "agent tearing down every slot; drop --no-torchrun or --baseline."
            )
