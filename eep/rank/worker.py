"""The worker of one slot: loads its experts, joins the fabric, serves the committed view.

Started by the slot supervisor as ``python -m eep.rank.worker '<json>'`` (etcd, cluster, slot,
incarnation); everything else comes from ``/eep/<cluster>/config``. The loop:
1. heartbeat (the supervisor renews the lease only while it moves) and check the fence
   deadline the supervisor publishes: past it, this process may already be excluded, so it
   exits without emitting anything more;
2. at the step boundary, apply the newest committed view (fabric, view tensors);
3. take new requests from the front-end and run one engine step (every live slot steps,
   with zero tokens if idle, because every exchange needs every live slot);
4. a step whose exchange failed is discarded: wait for a newer view (a peer died: the
   supervisor's revoke or the lease expiry brings one), and if none comes within
   TTL + 1 s, ask for one (the peer was slow, not dead); then re-run.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time

import torch

from eep.config import RuntimeConfig
from eep.engine.engine import Engine, TokenEvent
from eep.engine.kv_cache import BlockTable, KVCache, KVCacheConfig, KVCacheFull
from eep.engine.moe_exec import FabricMoE
from eep.engine.sampling import SamplingParams
from eep.engine.sequence import Sequence
from eep.events import EventLog
from eep.expert_arena import ExpertArena
from eep.fabrics.base import ExchangeFailed, FabricConfig
from eep.fabrics.factory import make_fabric
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.view import View
from eep.membership.watcher import ViewWatcher
from eep.model.qwen3_moe import load_model
from eep.placement import initial_placement
from eep.transfer.arena import Arena
from eep.transfer.config import TransferConfig
from eep.transfer.engine import start_transport
from eep.transfer.errors import TransferError
from eep.transfer.kv import block_checksums, pull_kv_blocks
from eep.transfer.manifest import ManifestStore
from eep.transfer.planner import TransferPlan
from eep.view_state import ViewState
from eep.wire import encode, recv_frame

from .status import StatusBlock, WorkerState

log = logging.getLogger("eep.rank.worker")
EXIT_FENCED = 3


class FrontendLink:
    """The worker's connection to the front-end: requests in (a queue), tokens out."""

    def __init__(self, client: EtcdClient, keys: Keys, slot: int, incarnation: int):
        self.client, self.keys, self.slot, self.incarnation = client, keys, slot, incarnation
        self.inbox: queue.Queue[dict] = queue.Queue()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.connected = threading.Event()
        threading.Thread(target=self._run, name="frontend-link", daemon=True).start()

    def _address(self) -> tuple[str, int] | None:
        kv = self.client.get(self.keys.frontend)
        if kv is None:
            return None
        addr = kv.json()["ranks"]
        return addr["host"], int(addr["port"])

    def _run(self) -> None:
        while True:
            try:
                addr = self._address()
                if addr is None:
                    time.sleep(0.2)
                    continue
                sock = socket.create_connection(addr, timeout=5)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    self._sock = sock
                self.send({"type": "hello", "slot": self.slot, "incarnation": self.incarnation})
                self.connected.set()
                while (msg := recv_frame(sock)) is not None:
                    self.inbox.put(msg)
            except OSError as exc:
                log.warning("slot %d: front-end link: %s; reconnecting", self.slot, exc)
            except Exception as exc:  # etcd errors, bad frames: keep the link alive
                log.warning("slot %d: front-end link error %r; reconnecting", self.slot, exc)
            self.connected.clear()
            with self._lock:
                self._sock = None
            time.sleep(0.2)

    def send(self, msg: dict) -> None:
        data = encode(msg)
        with self._lock:
            if self._sock is None:
                raise ConnectionError("front-end not connected")
            self._sock.sendall(data)

    def send_tokens(self, events: list[TokenEvent]) -> None:
        if events:
            rows = [
                [e.request_id, e.index, e.token, e.finished.value if e.finished else None]
                for e in events
            ]
            self.send({"type": "tokens", "slot": self.slot, "events": rows})


class Worker:
    def __init__(
        self,
        etcd: str,
        cluster: str,
        slot: int,
        incarnation: int,
        log_dir: str | None = None,
        baseline: bool = False,
    ):
        self.slot, self.incarnation = slot, incarnation
        self.baseline = baseline  # the full-restart baseline: weights from disk only
        self.events = EventLog.in_dir(log_dir, f"worker{slot}.{incarnation}")
        self.events.emit("worker_started", slot=slot, incarnation=incarnation)
        self.serving_epoch, self.discarded, self.degraded = 0, False, False
        self.client, self.keys = EtcdClient(etcd), Keys(cluster)
        kv = self.client.get(self.keys.config)
        if kv is None:
            raise SystemExit(f"no runtime config at {self.keys.config}; start with `eep launch`")
        self.cfg = RuntimeConfig.from_json(kv.value)
        self.status = StatusBlock(cluster, slot)
        self.watcher = ViewWatcher(self.client, self.keys).start()
        self.engine = self._build()
        self.link = FrontendLink(self.client, self.keys, slot, incarnation)

    def _ctx(self) -> str:
        return f"slot {self.slot} inc {self.incarnation} epoch {self.serving_epoch}"

    def _build(self) -> Engine:
        cfg = self.cfg
        device = (
            cfg.device if cfg.device == "cpu" else f"cuda:{self.slot % torch.cuda.device_count()}"
        )
        from eep.model.config import ModelConfig

        if cfg.device != "cpu":
            torch.cuda.set_device(device)  # NCCL and the IPC buffer use the current device
        model_cfg = ModelConfig.from_dir(cfg.model_path)
        placement = initial_placement(model_cfg.num_experts, cfg.num_slots, cfg.experts_per_slot)
        eps = cfg.experts_per_slot
        local = materialised(placement.slot_experts(self.slot), model_cfg.num_experts)
        self.device = device
        self.transfer_cfg = TransferConfig(protocol="tcp" if cfg.device == "cpu" else "cuda_ipc")
        self.transport = start_transport(self.transfer_cfg)
        self.manifests = ManifestStore(self.client, cfg.cluster, cfg.num_slots)
        kv_cfg = KVCacheConfig(
            model_cfg.num_hidden_layers,
            model_cfg.num_key_value_heads,
            model_cfg.head_dim,
            cfg.kv_blocks,
            cfg.block_size,
        )
        self.kv_arena = Arena.for_kv(
            "kv", cfg.kv_blocks, KVCache.block_nbytes(kv_cfg, cfg.torch_dtype), device
        )
        self.kv_arena.register(self.transport)
        self.detached: dict[str, BlockTable] = {}  # KV blocks lent to a migration
        model = self.load_model(local, first=True)
        self.view_state = ViewState(
            cfg.num_slots, eps, model_cfg.num_experts, placement.max_replicas, device
        )
        fabric_cfg = FabricConfig(
            cfg.num_slots,
            eps,
            model_cfg.hidden_size,
            model_cfg.num_experts_per_tok,
            cfg.max_tokens_per_step,
            cfg.torch_dtype,
            cfg.exchange_timeout_s,
        )
        self.fabric = make_fabric(
            cfg.fabric,
            cfg.cluster,
            self.slot,
            self.incarnation,
            fabric_cfg,
            self._newest_epoch,
            store_addr=cfg.fabric_store or None,
            device=device,
            elastic=cfg.elastic,
            view=self.view_state.device_view if cfg.fabric == "symm" else None,
            on_wait=self.status.bump,
            peer_info=self._fabric_peer,
        )
        engine = Engine(
            model,
            cfg.kv_blocks,
            cfg.block_size,
            cfg.max_tokens_per_step,
            moe=FabricMoE(self.fabric, self.view_state),
            kv_buffer=self.kv_arena.buffer,
            decode_graphs=cfg.cuda_graphs,
            max_seqs=cfg.max_num_seqs,
        )
        if engine.decode is not None:
            log.info(
                "%s: padded decode steps, CUDA graphs %s",
                self._ctx(),
                "on" if engine.decode.capture else "off (this device or fabric cannot)",
            )
        if cfg.fabric == "symm":
            # alone (no peer waits): every kernel of a step compiled before `ready`, so the
            # survivors never wait on a compile when this slot joins
            self.fabric.warm_up(engine.warm_up)
            self.events.emit("warmed_up", slot=self.slot, incarnation=self.incarnation)
            export = {"incarnation": self.incarnation, **self.fabric.export()}
            self.client.put(
                self.keys.fabric(self.slot), json.dumps(export), lease=self.status.get("lease_id")
            )
        return engine

    def _fabric_peer(self, slot: int, incarnation: int) -> dict | None:
        """``slot``'s published symm buffer if it is ``incarnation``'s, else ``None``."""
        kv = self.client.get(self.keys.fabric(slot))
        if kv is None:
            return None
        info = kv.json()
        return info if info.get("incarnation") == incarnation else None

    def _newest_epoch(self) -> int:
        latest = self.watcher.latest
        return latest.epoch if latest else 0

    # --- the loop --------------------------------------------------------------------------

    def serve(self) -> int:
        self.link.connected.wait(timeout=60)
        self.status.set("state", WorkerState.READY)
        self.events.emit("ready", slot=self.slot, incarnation=self.incarnation)
        log.info("%s: ready", self._ctx())
        while True:
            self.heartbeat()
            view = self.watcher.latest
            if view is not None and view.epoch > self.serving_epoch:
                self.apply(view)
            if not self.serving_epoch or self.degraded:
                time.sleep(0.01)
                continue
            self.take_requests()
            if not self.engine.scheduler.has_work() and self._peers_idle():
                time.sleep(0.002)  # idle everywhere we can tell: join when a peer starts
                continue
            try:
                events = self.engine.step()
            except ExchangeFailed as exc:
                log.warning("%s: step discarded: %s", self._ctx(), exc)
                self.events.emit(
                    "step_discarded",
                    slot=self.slot,
                    epoch=exc.epoch,
                    reason=exc.reason.value,
                    suspects=list(exc.suspects),
                )
                self.discarded = True
                self.await_newer_view(exc.epoch)
                continue
            if self.discarded:
                self.events.emit("resumed", slot=self.slot, epoch=self.serving_epoch)
                self.discarded = False
            self.emit(events)

    def _peers_idle(self) -> bool:
        """Nothing here to do and no peer has started a step (fabrics that cannot tell, the
        collective ones, step always)."""
        started = getattr(self.fabric, "peers_started", None)
        return started is not None and not started()

    def heartbeat(self) -> None:
        self.status.bump()
        deadline = self.status.get("fence_deadline")
        if time.monotonic() >= deadline:
            log.error(
                "%s: past the fence deadline (%.3f s ago); exiting without another token",
                self._ctx(),
                time.monotonic() - deadline,
            )
            os._exit(EXIT_FENCED)

    def apply(self, view: View) -> None:
        if view.incarnation(self.slot) != self.incarnation:
            if self.serving_epoch:
                log.error("%s: view %d excludes this incarnation; fencing", self._ctx(), view.epoch)
                os._exit(EXIT_FENCED)
            return  # not admitted yet
        self.view_state.apply(view)
        wanted = materialised(
            self.view_state.local_experts(self.slot), self.engine.model.config.num_experts
        )
        if wanted != self.engine.model.local_experts:
            self.reload_experts(wanted)
        # a view that orphans experts cannot compute the model: every member sees the same
        # placement, so all of them pause together until a view covers every expert again
        orphans = self.view_state.placement.orphans
        self.degraded = bool(orphans)
        if orphans:
            log.warning(
                "%s: view %d leaves experts %s without a live replica; pausing",
                self._ctx(),
                view.epoch,
                list(orphans),
            )
            self.events.emit("degraded", slot=self.slot, epoch=view.epoch, orphans=list(orphans))
        self.fabric.apply_view(view.epoch, dict(view.incarnations))
        self.serving_epoch = view.epoch
        self.status.set("epoch", view.epoch)
        self.events.emit(
            "view_applied", slot=self.slot, epoch=view.epoch, members=list(view.members)
        )
        log.info("%s: serving view %d members %s", self._ctx(), view.epoch, list(view.members))

    def load_model(self, local: tuple[int, ...], first: bool = False):
        """The model with experts ``local``: the dense weights from the checkpoint, the
        experts pulled from live holders (verified; the checkpoint for what none holds),
        then this slot's own manifest published under its lease. ``first``: this
        incarnation's start-up pull, the only one ``pull_hold_s`` holds open (a pull on a
        new view runs inside a step boundary, where a hold would stall every peer)."""
        cfg = self.cfg
        model = load_model(
            cfg.model_path, local, device=self.device, dtype=cfg.torch_dtype, experts=False
        )
        arena = ExpertArena(model, self.device)
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
            self.status.get("lease_id"),
            extra=(self.kv_arena,),
        )
        if not first:
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

    def reload_experts(self, local: tuple[int, ...]) -> None:
        """The placement gave this slot other experts: pull them (from live holders first)."""
        self.engine.model = self.load_model(local)

    def await_newer_view(self, epoch: int) -> None:
        deadline = time.monotonic() + self.cfg.ttl_s + 1.0
        asked = False
        while True:
            self.heartbeat()
            latest = self.watcher.latest
            if latest is not None and latest.epoch > epoch:
                return
            if not asked and time.monotonic() > deadline:
                log.warning(
                    "%s: no newer view after a failed exchange; asking for one", self._ctx()
                )
                self.status.set("resync_epoch", epoch)
                asked = True
            time.sleep(0.005)

    def take_requests(self) -> None:
        while True:
            try:
                msg = self.link.inbox.get_nowait()
            except queue.Empty:
                return
            kind = msg["type"]
            if kind == "request":
                params = SamplingParams(**msg["params"])
                seq = Sequence(msg["id"], list(msg["prompt"]), list(msg["emitted"]), params)
                try:
                    if msg.get("kv"):
                        self.migrate_in(seq, msg["kv"])
                    else:
                        self.engine.add(seq)
                except ValueError as exc:
                    log.error("%s: refusing %s: %s", self._ctx(), msg["id"], exc)
            elif kind == "abort":
                self.engine.scheduler.abort(msg["id"])
            elif kind == "migrate_out":
                self.migrate_out(msg["id"], msg["to"])
            elif kind == "release":
                table = self.detached.pop(msg["id"], None)
                if table is not None:
                    self.engine.kv.release(table)

    def migrate_out(self, request_id: str, to: int) -> None:
        """Hand a request to slot ``to``: stop running it here and lend its KV blocks until
        the receiver has read them (the front-end says ``release``)."""
        seq = self.engine.scheduler.detach(request_id)
        reply = {"type": "migrate_ready", "id": request_id, "to": to, "kv": None}
        if seq is not None and seq.num_computed > 0:
            blocks = seq.table.blocks[: self.engine.kv.blocks_for(seq.num_computed)]
            reply["kv"] = {
                "holder": str(self.slot),
                "blocks": list(blocks),
                "checksums": list(block_checksums(self.kv_arena, blocks)),
                "num_computed": seq.num_computed,
                "outputs": list(seq.outputs),
            }
            self.detached[request_id] = seq.table
        elif seq is not None:
            self.engine.kv.release(seq.table)
        self.link.send(reply)

    def migrate_in(self, seq: Sequence, kv: dict) -> None:
        """Take over a request with its KV: reserve blocks, read the holder's blocks into
        them (verified); if that fails, recompute them (prefill) instead."""
        src = list(kv["blocks"])
        try:
            self.engine.kv.reserve(seq.table, seq.max_len)
        except KVCacheFull:  # no room now: queue it and recompute its KV when it fits
            self.engine.add(seq)
            self.link.send({"type": "migrated", "id": seq.request_id, "ok": False})
            return
        started = time.monotonic()
        try:
            peer = self.manifests.get(kv["holder"]).peer
            pull_kv_blocks(
                self.transport,
                self.kv_arena,
                seq.table.blocks[: len(src)],
                peer,
                "kv",
                src,
                kv["checksums"],
                dst_holder=str(self.slot),
            )
            seq.num_computed, ok = int(kv["num_computed"]), True
        except (TransferError, OSError, ValueError) as exc:
            log.warning(
                "%s: KV of %s not migrated (%s); recomputing it", self._ctx(), seq.request_id, exc
            )
            seq.num_computed, ok = 0, False
        self.engine.scheduler.adopt(seq)
        self.events.emit(
            "kv_migrated",
            slot=self.slot,
            id=seq.request_id,
            ok=ok,
            blocks=len(src),
            bytes=len(src) * self.kv_arena.block_nbytes,
            seconds=time.monotonic() - started,
        )
        self.link.send({"type": "migrated", "id": seq.request_id, "ok": ok})

    def emit(self, events: list[TokenEvent]) -> None:
        try:
            self.link.send_tokens(events)
        except OSError as exc:
            log.warning("%s: could not send %d tokens: %s", self._ctx(), len(events), exc)


def materialised(slot_experts: tuple[int, ...], num_experts: int) -> tuple[int, ...]:
    """The experts to hold in local order: an empty position (``-1``, never routed to) holds
    an expert the slot does not otherwise hold, so the local ids stay distinct."""
    spare = iter(e for e in range(num_experts) if e not in slot_experts)
    return tuple(e if e >= 0 else next(spare) for e in slot_experts)


def _die_with_parent() -> None:
    """A worker whose supervisor dies must not serve on without a lease."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(raw: str) -> int:
    args = json.loads(raw)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker{args['slot']}: %(message)s",
    )
    _die_with_parent()
    torch.set_num_threads(1)
    worker = Worker(
        args["etcd"],
        args["cluster"],
        args["slot"],
        args["incarnation"],
        args.get("log_dir"),
        bool(args.get("baseline")),
    )
    return worker.serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
