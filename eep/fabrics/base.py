"""What every fabric shares: its interface (:class:`Fabric`), its configuration
(:class:`FabricConfig`, :class:`FabricMember`) and how an exchange fails."""

from __future__ import annotations

import abc
import enum
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from eep.kernels.view import DeviceView


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
    ``exchange_timeout_s``: the bounded wait for one sender, in seconds. It has no default
    here: the runtime passes ``RuntimeConfig.exchange_timeout_s``, a bench its own option.
    """

    num_slots: int
    experts_per_slot: int
    hidden: int
    topk: int
    max_tokens: int
    dtype: torch.dtype
    exchange_timeout_s: float

    def __post_init__(self) -> None:
        for name in ("num_slots", "experts_per_slot", "hidden", "topk", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"FabricConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 < self.exchange_timeout_s < math.inf:
            raise ValueError(
                f"FabricConfig.exchange_timeout_s must be > 0 s, got {self.exchange_timeout_s}."
            )

    @property
    def rows_per_sender(self) -> int:
        """Rows one sender may put in one destination's mailbox (all its (t, k) pairs)."""
        return self.max_tokens * self.topk


PeerInfo = Callable[[int, int], "dict | None"]


def publish_to_dir(root: str, cluster: str, slot: int, incarnation: int, export: dict) -> None:
    """For processes without etcd (the serve bench, tests): ``slot``'s export as a JSON file
    in ``root``, where :func:`peer_info_from_dir` finds it. The runtime publishes in etcd."""
    path = os.path.join(root, f"{cluster}-{slot}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"incarnation": incarnation, **export}, f)
    os.replace(path + ".tmp", path)


def peer_info_from_dir(root: str, cluster: str) -> PeerInfo:
    """The ``peer_info`` that reads what :func:`publish_to_dir` wrote."""

    def find(slot: int, incarnation: int) -> dict | None:
        try:
            with open(os.path.join(root, f"{cluster}-{slot}.json")) as f:
                info = json.load(f)
        except FileNotFoundError:
            return None
        return info if info["incarnation"] == incarnation else None

    return find


@dataclass(frozen=True, slots=True)
class FabricMember:
    """Who a fabric serves and the runtime's hooks it calls (``make_fabric``'s second half).

    ``slot`` and ``device`` place every fabric (``cluster`` and ``incarnation`` also name the
    ``shm`` segment); the rest matters to the fabrics named and is ignored by the others:
    - ``elastic``: ``False`` turns the elastic checks off (``shm``, ``symm``; for measuring
      their cost);
    - ``newest_epoch()``: the newest epoch the local watcher has seen; a wait gives up once it
      passes the epoch being served (``shm``, ``symm``);
    - ``on_wait()``: called while waiting on peers, so a rank that waits stays healthy
      (``shm``);
    - ``peer_info(slot, incarnation)``: that incarnation's :meth:`Fabric.export`, ``None`` if
      not published (``symm``, required there);
    - ``view``: the ``DeviceView`` the kernels read, the engine's where captured graphs must
      see one set of tensors (``symm``; default: the fabric's own);
    - ``store_addr``: ``host:port`` of the TCP store slot 0 hosts for the process group
      (``nccl``, unless the process is already in a group);
    - ``transport``: the rank's started transfer engine and ``host_id`` this host's identity
      (``te``, which writes to peers on other hosts through it; ``peer_info`` required there).
    """

    cluster: str
    slot: int
    incarnation: int
    device: torch.device | str = "cpu"
    elastic: bool = True
    newest_epoch: Callable[[], int] = lambda: 0
    on_wait: Callable[[], None] = lambda: None
    peer_info: PeerInfo | None = None
    view: DeviceView | None = None
    store_addr: str | None = None
    transport: Any = None
    host_id: str = ""


class Received(Protocol):
    """What a dispatch delivered to this slot: ``x`` ``[N, H]`` the rows, ``local_expert``
    ``[N]`` int64 the local expert each row is for."""

    @property
    def x(self) -> torch.Tensor: ...

    @property
    def local_expert(self) -> torch.Tensor: ...


# ``run_experts(moe, x [N, H], local_expert [N]) -> [N, H]``: the engine's expert MLPs
RunExperts = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


class Fabric(abc.ABC):
    """The data plane of one slot, as the runtime drives it; ``shm``, ``nccl`` and ``symm``
    implement every method, so no caller asks which fabric it holds.

    Life: built by ``make_fabric``; :meth:`warm_up`, then :meth:`export` published for peers;
    :meth:`apply_view` before the first exchange and at every step boundary with a new view;
    per engine step, :meth:`run_moe` (or :meth:`dispatch` + :meth:`combine`) per MoE layer,
    then :meth:`end_step`; :meth:`close`. A failed exchange raises :class:`ExchangeFailed`.
    """

    slot: int
    cfg: FabricConfig
    epoch: int  # the epoch being served (0 before the first view)
    members: tuple[int, ...]  # the slots exchanged with in that epoch

    # --- start-up ----------------------------------------------------------------------------

    @abc.abstractmethod
    def warm_up(self, run: Callable[[], object] | None = None) -> None:
        """Compiles what a step needs before this slot joins its peers, running ``run`` (one
        engine step) alone where the fabric can exchange with itself; a fabric that cannot run
        a step without its peers does nothing (its first step compiles instead)."""

    @abc.abstractmethod
    def export(self) -> dict | None:
        """What peers need to open this slot's buffers (JSON-able; the runtime publishes it
        under the slot's lease), or ``None`` where peers need nothing from this slot."""

    # --- views -------------------------------------------------------------------------------

    @abc.abstractmethod
    def apply_view(self, epoch: int, members: Mapping[int, int]) -> None:
        """Serve ``epoch`` with ``members`` (``{slot: incarnation}``); every live slot applies
        it at the same step boundary."""

    @abc.abstractmethod
    def peers_started(self) -> bool | None:
        """Whether a live peer has begun the next exchange (an idle slot joins a step only
        then); ``None``: this fabric cannot tell, the caller must step anyway."""

    # --- the exchange ------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def graph_safe(self) -> bool:
        """Whether :meth:`run_moe` runs a layer on the device without a host sync, so CUDA
        graphs can record it."""

    @abc.abstractmethod
    def dispatch(
        self, x: torch.Tensor, topk_phy: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[Received, Any]:
        """Send each ``(t, k)`` row of ``x`` ``[T, H]`` to the slot of physical expert
        ``topk_phy[t, k]`` (``[T, K]`` int, ``-1``: dropped); returns what this slot received
        and the handle :meth:`combine` needs."""

    @abc.abstractmethod
    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """Send expert outputs ``y`` ``[N, H]`` (rows of the dispatch's ``Received``) back;
        return this slot's weighted sum ``[T, H]`` over its top-k outputs, in ``k`` order."""

    def run_moe(
        self,
        moe,
        x: torch.Tensor,
        topk_phy: torch.Tensor,
        topk_weights: torch.Tensor,
        run_experts: RunExperts,
    ) -> torch.Tensor:
        """One MoE layer: ``x`` ``[T, H]`` -> ``[T, H]`` (``x.dtype``). Here: dispatch, this
        slot's experts on the rows that arrived (``run_experts``), combine; a fabric with a
        faster path (``symm``: the expert GEMM on its receive buffer) overrides it."""
        recv, handle = self.dispatch(x, topk_phy, topk_weights)
        y = run_experts(moe, recv.x.to(x.dtype), recv.local_expert)
        return self.combine(y, handle).to(x.dtype)

    @abc.abstractmethod
    def end_step(self) -> None:
        """After an engine step's last exchange: raises :class:`ExchangeFailed` if the fabric
        checks once per step and the step failed; nothing where every exchange checks itself."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases the fabric's buffers (or process group) once no peer still sends."""


def make_tag(epoch: int, seq: int) -> int:
    """The flag value of exchange ``seq`` of ``epoch``: epochs order first."""
    return (epoch << 40) | seq


def tag_epoch(tag: int) -> int:
    return tag >> 40
