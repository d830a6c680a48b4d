"""The worker of one slot: loads its experts, joins the fabric, serves the committed view.

Started by the slot supervisor as ``python -m eep.rank.worker '<json>'`` (etcd, cluster, slot,
incarnation); everything else comes from ``/eep/<cluster>/config``. The loop:
1. heartbeat (the supervisor renews the lease only while it moves) and check the fence
   deadline the supervisor publishes: past it, this process may already be excluded, so it
   exits without emitting anything more;
2. at the step boundary, apply the newest committed view (fabric, view tensors);
3. take new requests from the front-end (when the link came back to a restarted front-end,
   first abort every request of the dead one) and run one engine step (every live slot
   steps, with zero tokens if idle, because every exchange needs every live slot);
4. a step whose exchange failed is discarded: wait for a newer view (a peer died: the
   supervisor's revoke or the lease expiry brings one), and if none comes within
   TTL + 1 s, ask for one (the peer was slow, not dead, or cut off), naming the slots whose
   exchanges timed out in that epoch (the coordinator's suspicion vote); then re-run.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import sys
import time

import torch

from eep.config import RuntimeConfig
from eep.engine.engine import TokenEvent
from eep.engine.sequence import Sequence
from eep.events import EventLog
from eep.fabrics.base import ExchangeFailed
from eep.membership.errors import MembershipError
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.view import View
from eep.membership.watcher import ViewWatcher
from eep.protocol import Abort, MigrateOut, Refused, Release, Submit

from .build import Staged, build_rank, stage_rank
from .link import FrontendChanged, FrontendLink
from .migration import KvMigration
from .status import SUSPECT_SLOTS, StatusBlock, WorkerState
from .weights import materialised

__all__ = ["EXIT_FENCED", "Worker", "main", "materialised"]

log = logging.getLogger("eep.rank.worker")
EXIT_FENCED = 3


class Worker:
    def __init__(
        self,
        etcd: str,
        cluster: str,
        slot: int,
        incarnation: int,
        log_dir: str | None = None,
        baseline: bool = False,
        staged: Staged | None = None,
    ):
        self.slot, self.incarnation = slot, incarnation
        self.events = EventLog.in_dir(log_dir, f"worker{slot}.{incarnation}")
        self.events.emit(
            "worker_started", slot=slot, incarnation=incarnation, staged=staged is not None
        )
        self.serving_epoch, self.discarded, self.degraded = 0, False, False
        self.suspected: dict[int, set[int]] = {}  # epoch -> slots that timed out in it
        self.client, self.keys = EtcdClient(etcd), Keys(cluster)
        kv = self.client.get(self.keys.config)
        if kv is None:
            raise SystemExit(f"no runtime config at {self.keys.config}; start with `eep launch`")
        try:
            self.cfg = RuntimeConfig.from_json(kv.value)
        except ValueError as exc:
            raise SystemExit(f"{self.keys.config}: {exc}") from exc
        self.status = StatusBlock(cluster, slot)
        self.watcher = ViewWatcher(self.client, self.keys).start()
        rank = build_rank(
            self.cfg,
            slot,
            incarnation,
            self.client,
            self.keys,
            self.status,
            self.events,
            self._newest_epoch,
            baseline=baseline,
            staged=staged,
        )
        self.weights, self.view_state = rank.weights, rank.view_state
        self.fabric, self.engine = rank.fabric, rank.engine
        self.link = FrontendLink(self.client, self.keys, slot, incarnation, self.cfg.secret_file)
        self.migration = KvMigration(
            slot,
            rank.engine,
            rank.kv_arena,
            rank.transport,
            rank.manifests,
            # a reply the link cannot carry (the front-end is gone) is logged, not raised: a
            # worker must not die of its front-end
            self._send,
            self.events,
        )

    def _ctx(self) -> str:
        return f"slot {self.slot} inc {self.incarnation} epoch {self.serving_epoch}"

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
            # free KV for tooling, once a turn: a step's changes show at the next turn
            self.status.set("kv_free", self.engine.kv.free_blocks)
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
                self.suspect(exc.epoch, exc.suspects)
                self.await_newer_view(exc.epoch)
                continue
            if self.discarded:
                self.events.emit("resumed", slot=self.slot, epoch=self.serving_epoch)
                self.discarded = False
            self.emit(events)

    def _peers_idle(self) -> bool:
        """Nothing here to do and no peer has started a step (fabrics that cannot tell, the
        collective ones, step always)."""
        started = self.fabric.peers_started()  # None: this fabric cannot tell
        return started is not None and not started

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
            # the placement gave this slot other experts: pull them (live holders first)
            self.engine.model = self.weights.load(wanted)
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

    def suspect(self, epoch: int, slots) -> None:
        """Accumulate the slots whose exchanges timed out in ``epoch`` (older epochs are
        forgotten: a resync request names the suspects of its own epoch only)."""
        here = self.suspected.setdefault(epoch, set())
        for old in [e for e in self.suspected if e < epoch]:
            del self.suspected[old]
        wide = [s for s in slots if not 0 <= s < SUSPECT_SLOTS]
        if wide:
            log.warning("%s: slots %s do not fit the suspects bitmap", self._ctx(), wide)
        here.update(s for s in slots if 0 <= s < SUSPECT_SLOTS and s != self.slot)

    def await_newer_view(self, epoch: int) -> None:
        deadline = time.monotonic() + self.cfg.ttl_s + 1.0
        asked = False
        while True:
            self.heartbeat()
            latest = self.watcher.latest
            if latest is not None and latest.epoch > epoch:
                return
            if not asked and time.monotonic() > deadline:
                suspects = sorted(self.suspected.get(epoch, ()))
                log.warning(
                    "%s: no newer view after a failed exchange; asking for one (suspects %s)",
                    self._ctx(),
                    suspects,
                )
                self.status.ask_resync(epoch, suspects)
                asked = True
            time.sleep(0.005)

    def take_requests(self) -> None:
        while True:
            try:
                msg = self.link.inbox.get_nowait()
            except queue.Empty:
                return
            match msg:
                case Submit():
                    seq = Sequence(msg.id, list(msg.prompt), list(msg.emitted), msg.params)
                    try:
                        if msg.kv is not None:
                            self.migration.take_over(seq, msg.kv)
                        else:
                            self.engine.add(seq)
                    except ValueError as exc:  # it can never fit here: tell the front-end
                        log.error("%s: refusing %s: %s", self._ctx(), msg.id, exc)
                        self._send(Refused(msg.id, str(exc)))
                case Abort():
                    self.engine.scheduler.abort(msg.id)
                case MigrateOut():
                    self.migration.migrate_out(msg.id, msg.to)
                case Release():
                    self.migration.release(msg.id)
                case FrontendChanged():
                    self.drop_requests(msg)
                case _:
                    log.warning("%s: ignoring %s from the front-end", self._ctx(), type(msg))

    def drop_requests(self, change: FrontendChanged) -> None:
        """The front-end restarted: abort every request the old one sent (running, waiting,
        or stopped for a move with its KV lent), freeing their KV blocks. The new one knows
        nothing of them, so their tokens would have no reader and their blocks no release."""
        scheduler = self.engine.scheduler
        held = [seq.request_id for seq in (*scheduler.running, *scheduler.waiting)]
        for request_id in held:
            scheduler.abort(request_id)
        lent = self.migration.release_all()
        log.warning(
            "%s: front-end %s replaced %s; aborted its %d requests, released %d lent",
            self._ctx(),
            change.instance,
            change.previous,
            len(held),
            lent,
        )
        self.events.emit(
            "frontend_changed",
            slot=self.slot,
            instance=change.instance,
            previous=change.previous,
            aborted=len(held),
            released=lent,
        )

    def emit(self, events: list[TokenEvent]) -> None:
        try:
            self.link.send_tokens(events)
        except OSError as exc:
            log.warning("%s: could not send %d tokens: %s", self._ctx(), len(events), exc)

    def _send(self, msg) -> None:
        try:
            self.link.send(msg)
        except OSError as exc:
            log.warning("%s: could not send %s: %s", self._ctx(), msg.TYPE, exc)


def _die_with_parent() -> None:
    """A worker whose supervisor dies must not serve on without a lease."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _await_promotion(args: dict) -> tuple[bool, Staged | None]:
    """A standby (``eep.rank.standby``): warm what needs no slot, then wait on stdin for the
    incarnation to serve as. False when the supervisor closed the pipe without one; with it,
    what was staged (``standby_stage``), if anything."""
    started = time.monotonic()
    staged = warm_up(args)
    log.info(
        "standby: warm%s in %.2f s; waiting to be promoted",
        " and staged" if staged is not None else "",
        time.monotonic() - started,
    )
    line = sys.stdin.readline()
    if not line.strip():
        log.info("standby: released without a promotion")
        return False, None
    args["incarnation"] = int(json.loads(line)["incarnation"])
    log.info("standby: promoted to incarnation %d", args["incarnation"])
    return True, staged


def warm_up(args: dict) -> Staged | None:
    """What a worker does at start that needs no incarnation: the modules it would import
    lazily (the cluster's fabric, the transfer engine) and the device's context; with
    ``standby_stage``, also the slot's :class:`Staged` rank (a failure there only logs: the
    promoted worker builds it then)."""
    import importlib

    from eep.transfer import engine  # noqa: F401

    client = EtcdClient(args["etcd"])
    try:
        kv = client.get(Keys(args["cluster"]).config)
        cfg = RuntimeConfig.from_json(kv.value) if kv is not None else None
    except (ValueError, MembershipError) as exc:
        log.warning("standby: could not read the runtime config (%s); warming nothing more", exc)
        cfg = None
    finally:
        client.close()
    if cfg is None:
        return None
    importlib.import_module(f"eep.fabrics.{cfg.fabric}")
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        torch.empty(1, device=cfg.device).add_(1)  # the CUDA context and the caching allocator
        torch.cuda.synchronize()
    if not cfg.standby_stage:
        return None
    try:
        return stage_rank(cfg, args["slot"], touch=True)
    except Exception as exc:  # noqa: BLE001 (anything: the promoted worker stages it again)
        log.warning("standby: staging failed (%s); the promoted worker builds it", exc)
        return None


def main(raw: str) -> int:
    args = json.loads(raw)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker{args['slot']}: %(message)s",
    )
    _die_with_parent()
    torch.set_num_threads(1)
    staged = None
    if args.pop("standby", False):
        promoted, staged = _await_promotion(args)
        if not promoted:
            return 0
    worker = Worker(
        args["etcd"],
        args["cluster"],
        args["slot"],
        args["incarnation"],
        args.get("log_dir"),
        bool(args.get("baseline")),
        staged,
    )
    del staged  # the rank holds what it uses; a later re-placement must free the first model
    return worker.serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
