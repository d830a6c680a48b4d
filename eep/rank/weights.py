"""A rank's weights: the dense ones from the checkpoint, its experts from live peers.

:class:`WeightLoader` builds the model of one placement. Its experts are pulled from the slots
that hold them now, verified, and the checkpoint is read only for what no live slot holds (or
for everything, in the full-restart baseline). Then this slot's manifest is published under
its lease, so peers can pull from it in turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from eep.config import RuntimeConfig
from eep.events import EventLog
from eep.expert_arena import ExpertArena
from eep.model.qwen3_moe import Qwen3MoeModel, load_model
from eep.transfer.arena import Arena
from eep.transfer.config import TransferConfig
from eep.transfer.manifest import ManifestStore
from eep.transfer.planner import TransferPlan

log = logging.getLogger("eep.rank.weights")


def materialised(slot_experts: tuple[int, ...], num_experts: int) -> tuple[int, ...]:
    """The experts to hold in local order: an empty position (``-1``, never routed to) holds
    an expert the slot does not otherwise hold, so the local ids stay distinct."""
    spare = iter(e for e in range(num_experts) if e not in slot_experts)
    return tuple(e if e >= 0 else next(spare) for e in slot_experts)


def build_model(
    cfg: RuntimeConfig, local: tuple[int, ...], device: str
) -> tuple[Qwen3MoeModel, ExpertArena]:
    """The model of experts ``local``, its dense weights read from the checkpoint, its expert
    stacks views of a new (unfilled) :class:`ExpertArena`."""
    model = load_model(cfg.model_path, local, device=device, dtype=cfg.torch_dtype, experts=False)
    return model, ExpertArena(model, device)


class WeightLoader:
    def __init__(
        self,
        cfg: RuntimeConfig,
        slot: int,
        incarnation: int,
        device: str,
        transport,
        transfer_cfg: TransferConfig,
        manifests: ManifestStore,
        kv_arena: Arena,
        lease_id: Callable[[], int],
        events: EventLog,
        baseline: bool = False,
    ):
        self.cfg, self.slot, self.incarnation, self.device = cfg, slot, incarnation, device
        self.transport, self.transfer_cfg, self.manifests = transport, transfer_cfg, manifests
        self.kv_arena, self.lease_id, self.events = kv_arena, lease_id, events
        self.baseline = baseline  # the full-restart baseline: weights from disk only
        self.expert_arena: ExpertArena | None = None

    def _ctx(self) -> str:
        return f"slot {self.slot} inc {self.incarnation}"

    def load(
        self,
        local: tuple[int, ...],
        first: bool = False,
        built: tuple[Qwen3MoeModel, ExpertArena] | None = None,
    ):
        """The model with experts ``local``. ``first``: this incarnation's start-up pull, the
        only one ``pull_hold_s`` holds open (a pull on a new view runs inside a step
        boundary, where a hold would stall every peer). ``built``: :func:`build_model`'s
        result for ``local``, made ahead (a staged rank)."""
        cfg = self.cfg
        model, arena = built if built is not None else build_model(cfg, local, self.device)
        stats = arena.fill(
            self.transport,
            self.manifests,
            self.transfer_cfg,
            cfg.model_path,
            exclude=(str(self.slot),),
            peers=not self.baseline,
            on_plan=lambda plan: self._pull_planned(plan, hold=first),
        )
        arena.publish(
            self.transport,
            self.manifests,
            str(self.slot),
            self.transfer_cfg.host_id,
            self.slot,
            self.incarnation,
            self.lease_id(),
            extra=(self.kv_arena,),
            known=stats.checksums,
        )
        if self.expert_arena is not None:
            # the manifest now names the new arena; the old one's memory is freed with the old
            # model, and a registration left on it makes the transfer engine refuse a later
            # arena allocated over it ("overlapped memory region": the worker died after a
            # few re-placements) and would serve a peer's stale read from freed memory
            self.expert_arena.arena.unregister()
        self.expert_arena = arena
        self.events.emit(
            "weights_loaded",
            slot=self.slot,
            bytes=stats.nbytes,
            seconds=stats.seconds,
            gbps=stats.gbps,
            sources=stats.from_peers,
            from_disk=stats.from_disk,
            failed_sources=stats.failed,
        )
        log.info(
            "%s: experts %s: %d B in %.2f s (%.2f GB/s) from peers %s, %d B from disk",
            self._ctx(),
            list(local),
            stats.nbytes,
            stats.seconds,
            stats.gbps,
            stats.from_peers,
            stats.from_disk,
        )
        return model

    def _pull_planned(self, plan: TransferPlan, hold: bool) -> None:
        """The pull is planned and nothing has moved yet: say from whom (what the chaos
        bench waits for to kill a source or this worker mid-pull), then hold it open
        ``pull_hold_s`` if asked."""
        holders = sorted(plan.by_holder())
        self.events.emit(
            "pull_started",
            slot=self.slot,
            incarnation=self.incarnation,
            sources=[int(h) for h in holders if h.isdigit()],
            holders=holders,
            from_disk=len(plan.disk),
        )
        if hold and self.cfg.pull_hold_s > 0:
            log.warning(
                "%s: holding the pull open %.1f s (pull_hold_s: a fault-injection hook)",
                self._ctx(),
                self.cfg.pull_hold_s,
            )
            time.sleep(self.cfg.pull_hold_s)
