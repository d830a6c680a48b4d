"""Building one rank: device, transport, KV arena, model and experts, fabric, engine.

:func:`build_rank` does all the I/O of a worker's start-up in order and returns the parts as one
:class:`Rank`; the worker keeps no half-built state. The order matters: the KV arena is
registered with the transport before the weights are loaded, because the slot's manifest (which
names both) is published at the end of the load; the fabric is warmed up and exported last, so
peers find it only once every kernel of a step is compiled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from eep.config import RuntimeConfig
from eep.engine.engine import Engine
from eep.engine.kv_cache import KVCache, KVCacheConfig
from eep.engine.moe_exec import FabricMoE
from eep.events import EventLog
from eep.expert_arena import ExpertArena
from eep.fabrics.base import Fabric, FabricConfig, FabricMember
from eep.fabrics.factory import make_fabric
from eep.membership.errors import MembershipError, decode_object
from eep.membership.etcd import EtcdClient
from eep.membership.host import this_host
from eep.membership.keys import Keys
from eep.model.config import ModelConfig
from eep.model.qwen3_moe import Qwen3MoeModel
from eep.placement import Placement, initial_placement
from eep.transfer.arena import Arena
from eep.transfer.config import TransferConfig
from eep.transfer.engine import start_transport
from eep.transfer.manifest import ManifestStore
from eep.view_state import ViewState

from .status import StatusBlock
from .weights import WeightLoader, build_model, materialised

log = logging.getLogger("eep.rank.build")


@dataclass
class Rank:
    """What a worker serves with."""

    device: str
    transport: object
    manifests: ManifestStore
    kv_arena: Arena
    weights: WeightLoader
    view_state: ViewState
    fabric: Fabric
    engine: Engine


def rank_device(cfg: RuntimeConfig, slot: int) -> str:
    """``cpu``, or ``cuda:<slot % device_count>`` (slots share GPUs round-robin)."""
    return cfg.device if cfg.device == "cpu" else f"cuda:{slot % torch.cuda.device_count()}"


@dataclass
class Staged:
    """What a worker builds before it pulls: nothing in it names an incarnation, is shared
    with a peer, or is published, so a warm standby builds it ahead (``standby_stage``) and a
    cold worker builds it first thing. The expert arena is allocated for the slot's initial
    placement (a worker's first load always uses it) and not filled."""

    config: str  # the runtime config's JSON it was built for
    device: str
    transport: object
    transfer_cfg: TransferConfig
    kv_arena: Arena
    placement: Placement
    local: tuple[int, ...]  # the experts the arena is laid out for, in local order
    model: Qwen3MoeModel  # dense weights loaded; its expert stacks are views of ``experts``
    experts: ExpertArena


def stage_rank(cfg: RuntimeConfig, slot: int, touch: bool = False) -> Staged:
    """Build :class:`Staged` for ``slot``. ``touch``: write every page of the arenas now
    (a standby: their first-touch faults then cost nothing at promotion)."""
    device = rank_device(cfg, slot)
    if cfg.device != "cpu":
        torch.cuda.set_device(device)  # NCCL and the IPC buffer use the current device
    model_cfg = ModelConfig.from_dir(cfg.model_path)
    placement = initial_placement(model_cfg.num_experts, cfg.num_slots, cfg.experts_per_slot)
    host = this_host()  # where peers on other hosts reach this rank (eep launch --address)
    transfer_cfg = TransferConfig(
        protocol="tcp" if cfg.device == "cpu" else "cuda_ipc",
        hostname=host.address,
        host_id=host.host_id,
    )
    transport = start_transport(transfer_cfg)
    kv_cfg = KVCacheConfig(
        model_cfg.num_hidden_layers,
        model_cfg.num_key_value_heads,
        model_cfg.head_dim,
        cfg.kv_blocks,
        cfg.block_size,
    )
    kv_arena = Arena.for_kv(
        "kv", cfg.kv_blocks, KVCache.block_nbytes(kv_cfg, cfg.torch_dtype), device
    )
    kv_arena.register(transport)
    local = materialised(placement.slot_experts(slot), model_cfg.num_experts)
    model, experts = build_model(cfg, local, device)
    if touch:
        kv_arena.buffer.zero_()
        experts.arena.buffer.zero_()
    return Staged(
        cfg.to_json(), device, transport, transfer_cfg, kv_arena, placement, local, model, experts
    )


def build_rank(
    cfg: RuntimeConfig,
    slot: int,
    incarnation: int,
    client: EtcdClient,
    keys: Keys,
    status: StatusBlock,
    events: EventLog,
    newest_epoch: Callable[[], int],
    baseline: bool = False,
    staged: Staged | None = None,
) -> Rank:
    """The rank of ``slot`` as ``incarnation``; ``staged``: what a warm standby built ahead
    (used when it was built for this very config, else built again here)."""
    if staged is not None and staged.config != cfg.to_json():
        log.warning("slot %d: the staged rank was built for another config; building again", slot)
        staged.transport.close()
        staged = None
    if staged is None:
        staged = stage_rank(cfg, slot)
    device, transport, transfer_cfg = staged.device, staged.transport, staged.transfer_cfg
    kv_arena, placement = staged.kv_arena, staged.placement
    model_cfg = staged.model.config
    manifests = ManifestStore(client, cfg.cluster, cfg.num_slots)
    weights = WeightLoader(
        cfg,
        slot,
        incarnation,
        device,
        transport,
        transfer_cfg,
        manifests,
        kv_arena,
        lambda: status.get("lease_id"),
        events,
        baseline=baseline,
    )
    model = weights.load(staged.local, first=True, built=(staged.model, staged.experts))
    view_state = ViewState(
        cfg.num_slots, cfg.experts_per_slot, model_cfg.num_experts, placement.max_replicas, device
    )
    fabric_cfg = FabricConfig(
        cfg.num_slots,
        cfg.experts_per_slot,
        model_cfg.hidden_size,
        model_cfg.num_experts_per_tok,
        cfg.max_tokens_per_step,
        cfg.torch_dtype,
        cfg.exchange_timeout_s,
    )

    def peer_buffer(peer: int, peer_incarnation: int) -> dict | None:
        """``peer``'s published fabric buffers if they are ``peer_incarnation``'s."""
        kv = client.get(keys.fabric(peer))
        if kv is None:
            return None
        try:
            info = decode_object(kv.value, kv.key, MembershipError)
        except MembershipError as exc:
            log.warning("slot %d: %s; ignoring it", slot, exc)
            return None
        return info if info.get("incarnation") == peer_incarnation else None

    fabric = make_fabric(
        cfg.fabric,
        fabric_cfg,
        FabricMember(
            cluster=cfg.cluster,
            slot=slot,
            incarnation=incarnation,
            device=device,
            elastic=cfg.elastic,
            newest_epoch=newest_epoch,
            on_wait=status.bump,
            peer_info=peer_buffer,
            view=view_state.device_view,  # the engine's, so captured graphs read it
            store_addr=cfg.fabric_store or None,
            transport=transport,
            host_id=transfer_cfg.host_id,
        ),
    )
    engine = Engine(
        model,
        cfg.kv_blocks,
        cfg.block_size,
        cfg.max_tokens_per_step,
        moe=FabricMoE(fabric, view_state),
        kv_buffer=kv_arena.buffer,
        decode_graphs=cfg.cuda_graphs,
        max_seqs=cfg.max_num_seqs,
        max_graphs=cfg.max_cuda_graphs,
    )
    if engine.decode is not None:
        log.info(
            "slot %d inc %d: padded decode steps, CUDA graphs %s",
            slot,
            incarnation,
            "on" if engine.decode.capture else "off (this device or fabric cannot)",
        )
    # alone (no peer waits): every kernel of a step compiled before `ready`, so the survivors
    # never wait on a compile when this slot joins (fabrics that cannot step alone do nothing)
    fabric.warm_up(engine.warm_up)
    events.emit("warmed_up", slot=slot, incarnation=incarnation)
    export = fabric.export()
    if export is not None:  # peers open this slot's buffers from it (symm, te)
        client.put(
            keys.fabric(slot),
            json.dumps({"incarnation": incarnation, **export}),
            lease=status.get("lease_id"),
        )
    return Rank(device, transport, manifests, kv_arena, weights, view_state, fabric, engine)
