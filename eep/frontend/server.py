"""The front-end process: HTTP for users, msgpack links to ranks, the committed view.

Requests go to the live slot with the fewest requests in flight. When a committed view drops
a slot (or admits a new incarnation of it), that slot's in-flight requests are re-queued on
survivors with their prompt and the tokens already emitted; under greedy decoding (and seeded
sampling, whose draws depend only on the request and the token index) the continuation is the
same. A request accepted while no slot is live waits in the log: nothing accepted is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from eep.config import RuntimeConfig
from eep.engine.sampling import SamplingParams
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.session import Session, SessionConfig
from eep.membership.view import View
from eep.membership.watcher import ViewWatcher
from eep.wire import FrameError, encode, read_frame

from .request_log import Record, RequestLog, RequestState
from .tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 4096


class BadRequest(web.HTTPBadRequest):
    """A 400 with an OpenAI-style error body."""

    def __init__(self, message: str):
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
        super().__init__(text=body, content_type="application/json")


class UnknownModel(web.HTTPNotFound):
    def __init__(self, message: str):
        body = json.dumps({"error": {"message": message, "type": "model_not_found"}})
        super().__init__(text=body, content_type="application/json")


class Frontend:
    def __init__(self, cfg: RuntimeConfig, client: EtcdClient, keys: Keys, vocab_size: int):
        self.cfg, self.client, self.keys = cfg, client, keys
        self.log = RequestLog()
        self.tokenizer = ByteTokenizer(vocab_size)
        self.vocab_size = vocab_size
        self.links: dict[int, tuple[int, asyncio.StreamWriter]] = {}
        self.view: View | None = None
        self.requeued = 0
        self.migrated = 0
        # per slot, for fault tooling: requests re-queued off it, and moved onto it with their
        # KV (a rejoined slot takes in-flight load)
        self.requeued_from: dict[int, int] = {}
        self.migrated_to: dict[int, int] = {}
        # tokens accepted from a (slot, incarnation) that the current view excludes: an
        # invariant (it must stay 0), counted so a chaos run can check it
        self.stale_accepted = 0
        self.tokens_from: dict[int, int] = {}  # tokens accepted from each slot
        self.joined: set[int] = set()  # slots that (re)joined and may take load
        self.lenders: dict[str, int] = {}  # request id -> slot lending its KV blocks
        self.loop: asyncio.AbstractEventLoop | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # --- ranks -----------------------------------------------------------------------------

    async def handle_rank(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        slot = None
        try:
            hello = await read_frame(reader)
            slot, incarnation = int(hello["slot"]), int(hello["incarnation"])
            self.links[slot] = (incarnation, writer)
            log.info("rank link up: slot %d incarnation %d", slot, incarnation)
            self.dispatch_queued()
            self.rebalance()
            while True:
                msg = await read_frame(reader)
                if msg["type"] == "tokens":
                    excluded = self.view is None or self.view.incarnation(slot) != incarnation
                    for request_id, index, token, finish in msg["events"]:
                        ok = self.log.accept(request_id, index, token, finish, (slot, incarnation))
                        self.stale_accepted += ok and excluded
                        self.tokens_from[slot] = self.tokens_from.get(slot, 0) + ok
                elif msg["type"] == "migrate_ready":
                    self.on_migrate_ready(slot, msg)
                elif msg["type"] == "migrated":
                    holder = self.lenders.pop(msg["id"], None)
                    self.on_migrated(msg, holder)
        except (asyncio.IncompleteReadError, ConnectionError, FrameError, KeyError) as exc:
            log.info("rank link down: slot %s (%s)", slot, exc.__class__.__name__)
        finally:
            if slot is not None and self.links.get(slot, (None, None))[1] is writer:
                del self.links[slot]
            writer.close()

    def live_slots(self) -> list[int]:
        if self.view is None:
            return []
        return [
            s
            for s in self.view.members
            if s in self.links and self.links[s][0] == self.view.incarnation(s)
        ]

    def on_view(self, view: View) -> None:
        """Runs on the event loop for every committed view, in epoch order."""
        previous, self.view = self.view, view
        for rec in self.log.in_flight():
            if rec.slot is not None and view.incarnation(rec.slot) != rec.incarnation:
                log.info(
                    "epoch %d: re-queueing %s from slot %d after %d tokens",
                    view.epoch,
                    rec.request_id,
                    rec.slot,
                    len(rec.emitted),
                )
                self.requeued_from[rec.slot] = self.requeued_from.get(rec.slot, 0) + 1
                rec.slot, rec.state, rec.migrating = None, RequestState.QUEUED, False
                rec.requeues += 1
                self.requeued += 1
        old = dict(previous.incarnations) if previous else {}
        self.joined |= {s for s, inc in view.incarnations if previous and old.get(s) != inc}
        self.dispatch_queued()
        self.rebalance()

    def rebalance(self) -> None:
        """Move in-flight requests onto slots that (re)joined, with their KV blocks, until
        loads are even: a restarted rank serves the existing load, not only new requests."""
        live = self.live_slots()
        for target in sorted(self.joined & set(live)):
            self.joined.discard(target)
            load = {s: [] for s in live}
            for rec in self.log.in_flight():
                if rec.slot in load and rec.state is RequestState.RUNNING:
                    load[rec.slot].append(rec)
            fair = sum(len(v) for v in load.values()) // len(live)
            while len(load[target]) < fair:
                source = max(live, key=lambda s: (len(load[s]), -s))
                movable = [r for r in load[source] if not r.migrating]
                if len(load[source]) <= fair or not movable:
                    break
                rec = movable[-1]
                load[source].remove(rec)
                load[target].append(rec)
                rec.migrating = True
                log.info(
                    "rebalance: moving %s from slot %d to slot %d, which joined",
                    rec.request_id,
                    source,
                    target,
                )
                self.links[source][1].write(
                    encode({"type": "migrate_out", "id": rec.request_id, "to": target})
                )

    def on_migrate_ready(self, sender: int, msg: dict) -> None:
        """The old owner stopped the request and lends its KV: give it to the target."""
        rec = self.log.records.get(msg["id"])
        target = int(msg["to"])
        if rec is None or rec.state is RequestState.FINISHED or rec.slot != sender:
            log.info("migration of %s: finished or re-queued meanwhile; nothing to move", msg["id"])
            return
        kv = msg.get("kv")
        if kv is not None and list(kv["outputs"]) != rec.emitted:
            log.warning(
                "migration of %s: rank outputs differ from the log; recomputing KV", rec.request_id
            )
            kv = None
        rec.migrating = False
        if kv is None:
            log.info(
                "migration of %s: no KV computed yet; slot %d starts it afresh",
                rec.request_id,
                target,
            )
        if target not in self.live_slots():
            rec.slot, rec.state = None, RequestState.QUEUED
            self.assign(rec)
            return
        self.send_to(rec, target, kv)
        if kv is not None:
            self.migrated += 1
            self.migrated_to[target] = self.migrated_to.get(target, 0) + 1
            self.lenders[rec.request_id] = sender

    def send_to(self, rec: Record, slot: int, kv: dict | None = None) -> None:
        msg = {
            "type": "request",
            "id": rec.request_id,
            "prompt": rec.prompt,
            "emitted": list(rec.emitted),
            "params": _params_dict(rec.params),
        }
        if kv is not None:
            msg["kv"] = {k: kv[k] for k in ("holder", "blocks", "checksums", "num_computed")}
        self.links[slot][1].write(encode(msg))
        rec.slot, rec.incarnation, rec.state = slot, self.links[slot][0], RequestState.RUNNING

    def on_migrated(self, msg: dict, holder: int | None) -> None:
        if holder is not None and holder in self.links:
            self.links[holder][1].write(encode({"type": "release", "id": msg["id"]}))

    def dispatch_queued(self) -> None:
        for rec in self.log.in_flight():
            if rec.state is RequestState.QUEUED:
                self.assign(rec)

    def assign(self, rec: Record) -> None:
        live = self.live_slots()
        if not live:
            return
        load = {s: 0 for s in live}
        for other in self.log.in_flight():
            if other.slot in load:
                load[other.slot] += 1
        self.send_to(rec, min(live, key=lambda s: (load[s], s)))

    # --- HTTP ------------------------------------------------------------------------------

    def parse(self, body: dict) -> tuple[list[int], SamplingParams, bool]:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model", self.cfg.model_name)
        if model != self.cfg.model_name:
            raise UnknownModel(
                f"model {model!r} is not served here; this server has {self.cfg.model_name!r}"
            )
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
            ids = prompt
        else:
            raise BadRequest("'prompt' must be a string or a list of token ids")
        if not ids:
            raise BadRequest("'prompt' must not be empty")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise BadRequest(f"token ids must be in [0, {self.vocab_size})")
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported")
        try:
            params = SamplingParams(
                max_tokens=_int(body, "max_tokens", 16, 1, MAX_TOKENS_LIMIT),
                temperature=_num(body, "temperature", 0.0, 0.0, 2.0),
                top_p=_num(body, "top_p", 1.0, 1e-9, 1.0),
                seed=_int(body, "seed", secrets.randbits(31), 0, 2**62),
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false")
        return ids, params, stream

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from exc
        ids, params, stream = self.parse(body)
        rec = Record(f"cmpl-{uuid.uuid4().hex[:24]}", ids, params)
        self.log.add(rec)
        self.assign(rec)
        if stream:
            return await self._stream(request, rec)
        while rec.state is not RequestState.FINISHED:
            await rec.updates.get()
        return web.json_response(self._completion(rec, rec.emitted, rec.finish_reason))

    def _completion(self, rec: Record, tokens: list[int], finish: str | None) -> dict:
        return {
            "id": rec.request_id,
            "object": "text_completion",
            "created": int(rec.created),
            "model": self.cfg.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": self.tokenizer.decode(tokens),
                    "token_ids": tokens,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": len(rec.prompt),
                "completion_tokens": len(rec.emitted),
                "total_tokens": len(rec.prompt) + len(rec.emitted),
            },
        }

    async def _stream(self, request: web.Request, rec: Record) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        finish = None
        while finish is None:
            token, finish = await rec.updates.get()
            chunk = self._completion(rec, [token], finish)
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.cfg.model_name, "object": "model", "owned_by": "eep"}],
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        live = self.live_slots()
        body = {
            "status": "ok" if live else "unavailable",
            "epoch": self.view.epoch if self.view else 0,
            "live_slots": live,
            "num_slots": self.cfg.num_slots,
        }
        return web.json_response(body, status=200 if live else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def collect(self):
        """Prometheus metrics, read from the front-end's state at each scrape (the
        ``prometheus_client`` collector protocol)."""
        for name, value, text in [
            ("eep_requests", len(self.log.records), "requests accepted"),
            ("eep_requests_completed", self.log.completed, "requests finished"),
            ("eep_tokens", self.log.tokens, "tokens streamed"),
            ("eep_requeued", self.requeued, "requests moved off a dead slot"),
            ("eep_duplicate_tokens", self.log.duplicates, "tokens dropped as duplicates"),
            ("eep_stale_tokens", self.log.stale, "tokens dropped: from a rank taken off"),
            ("eep_stale_accepted", self.stale_accepted, "tokens accepted from excluded ranks"),
            ("eep_migrated", self.migrated, "requests moved with their KV"),
        ]:
            yield CounterMetricFamily(name, text, value=value)
        for name, value, text in [
            ("eep_requests_in_flight", len(self.log.in_flight()), "requests not finished"),
            ("eep_view_epoch", self.view.epoch if self.view else 0, "committed epoch"),
            ("eep_live_slots", len(self.live_slots()), "slots serving"),
        ]:
            yield GaugeMetricFamily(name, text, value=value)
        state = self.slots_state()["slots"]
        per_slot = [
            ("eep_slot_requests_in_flight", "in_flight", GaugeMetricFamily, "requests on it"),
            ("eep_slot_requeued", "requeued_from", CounterMetricFamily, "re-queued off it"),
            ("eep_slot_migrated", "migrated_to", CounterMetricFamily, "moved onto it with KV"),
            ("eep_slot_tokens", "tokens", CounterMetricFamily, "tokens it served"),
        ]
        for name, key, family, text in per_slot:
            metric = family(name, f"per slot: {text}", labels=["slot"])
            for slot, entry in state.items():
                metric.add_metric([slot], entry[key])
            yield metric

    def slots_state(self) -> dict:
        """Per slot: requests in flight on it (and how many of those already streamed a
        token), re-queued off it, migrated onto it and tokens served by it since start. What
        fault tooling reads to inject a fault only into live load, and to prove afterwards
        that it landed."""
        slots: dict[int, dict] = {
            s: {"in_flight": 0, "emitting": 0, "requeued_from": 0, "migrated_to": 0}
            for s in range(self.cfg.num_slots)
        }
        for rec in self.log.in_flight():
            if rec.slot in slots and rec.state is RequestState.RUNNING:
                slots[rec.slot]["in_flight"] += 1
                slots[rec.slot]["emitting"] += bool(rec.emitted)
        for s, entry in slots.items():
            entry["requeued_from"] = self.requeued_from.get(s, 0)
            entry["migrated_to"] = self.migrated_to.get(s, 0)
            entry["tokens"] = self.tokens_from.get(s, 0)
            entry["live"] = s in self.live_slots()
            entry["incarnation"] = self.view.incarnation(s) if self.view else None
        return {
            "epoch": self.view.epoch if self.view else 0,
            "requeued": self.requeued,
            "migrated": self.migrated,
            "stale_accepted": self.stale_accepted,
            "slots": {str(s): v for s, v in slots.items()},
        }

    async def debug_slots(self, request: web.Request) -> web.Response:
        return web.json_response(self.slots_state())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/debug/slots", self.debug_slots)
        return app


def _params_dict(p: SamplingParams) -> dict:
    return {
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "seed": p.seed,
        "stop_token_ids": list(p.stop_token_ids),
    }


def _int(body: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if type(value) is not int or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _num(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


async def serve(
    cfg: RuntimeConfig,
    etcd: str,
    host: str,
    http_port: int,
    vocab_size: int,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the front-end until cancelled."""
    client, keys = EtcdClient(etcd), Keys(cfg.cluster)
    front = Frontend(cfg, client, keys, vocab_size)
    loop = asyncio.get_running_loop()
    rank_server = await asyncio.start_server(front.handle_rank, host, 0)
    rank_port = rank_server.sockets[0].getsockname()[1]
    runner = web.AppRunner(front.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, http_port)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # the port chosen when 0 was asked
    session = Session(client, SessionConfig(ttl_s=cfg.ttl_s), name="frontend").open()
    address = {
        "http": {"host": host, "port": http_port},
        "ranks": {"host": host, "port": rank_port},
        "pid": os.getpid(),
        "since": time.time(),
    }
    client.put(keys.frontend, json.dumps(address), lease=session.lease_id)
    watcher = ViewWatcher(
        client, keys, on_view=lambda v: loop.call_soon_threadsafe(front.on_view, v)
    ).start()
    log.info("front-end: http://%s:%d (ranks on %d)", host, http_port, rank_port)
    if ready is not None:
        ready.set()
    try:
        while not session.done.is_set():
            await asyncio.sleep(0.2)
        log.error("front-end: lost its etcd session (%s); exiting", session.loss)
    finally:
        watcher.stop()
        session.close()
        await runner.cleanup()
        rank_server.close()
