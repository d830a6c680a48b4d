"""The OpenAI-compatible HTTP layer of the front-end: ``/v1/completions`` and
``/v1/chat/completions`` (streamed or not), ``/v1/models``, ``/health``, ``/metrics`` and
``/debug/slots``.

It validates a request (:mod:`.validate`), admits it into the front-end's log, and answers
from the log's stream of tokens and released text (:mod:`.responses` shapes the bodies). Every
error is a JSON body ``{"error": {"message", "type", "param", "code"}}`` that names the
problem: 400 for a body that is not valid (or asks for more context than the model has, or a
chat of a model without a chat template), 404 for another model or route, 413 for a body over
16 MiB, 429 with ``Retry-After`` when the queue is full. A client that goes away aborts its
request (the app runs with ``handler_cancellation``), and a request's record is dropped once
its response is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .detokenize import TextStream
from .metrics import FrontendCollector
from .request_log import Record, RequestState, Update
from .responses import ChatBodies, CompletionBodies
from .validate import (
    INVALID,
    ApiError,
    Parsed,
    decode_body,
    error_body,
    parse_chat,
    parse_completion,
)

if TYPE_CHECKING:
    from .core import Frontend

log = logging.getLogger("eep.frontend.api")
MAX_BODY = 16 << 20


# --- the HTTP layer -----------------------------------------------------------------------


class OpenAIApi:
    def __init__(self, front: Frontend):
        self.front = front
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FrontendCollector(front))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        bodies = CompletionBodies(self.front.cfg.model_name)
        return await self._serve(request, parse_completion, bodies, "cmpl")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        bodies = ChatBodies(self.front.cfg.model_name)
        return await self._serve(request, parse_chat, bodies, "chatcmpl")

    async def _serve(
        self,
        request: web.Request,
        parse: Callable[[Any, Frontend], Parsed],
        bodies: CompletionBodies | ChatBodies,
        prefix: str,
    ) -> web.StreamResponse:
        front = self.front
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(
                413, f"the body is over {MAX_BODY} bytes", code="too_large", reason="too_large"
            ) from None
        req = parse(decode_body(raw), front)
        text = TextStream(front.tokenizer, req.stop)
        rec = Record(f"{prefix}-{uuid.uuid4().hex[:24]}", req.prompt, req.params, text=text)
        if not front.admit(rec):
            wait = front.retry_after()
            raise ApiError(
                429,
                f"the server is at capacity: {front.cfg.max_queue} requests already wait for a "
                f"slot; retry after {wait} s",
                kind="rate_limit_error",
                code="queue_full",
                reason="queue_full",
                headers={"Retry-After": str(wait)},
            )
        try:
            if req.stream:
                return await self._stream(request, rec, bodies, req.include_usage)
            while rec.state is not RequestState.FINISHED:
                await rec.updates.get()
            if rec.error is not None:
                raise _failure(rec)
            return web.json_response(bodies.whole(rec))
        finally:  # answered, failed, or the client went away (the handler is cancelled)
            front.finish_response(rec)

    async def _stream(
        self,
        request: web.Request,
        rec: Record,
        bodies: CompletionBodies | ChatBodies,
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await resp.prepare(request)
            if opening := bodies.opening(rec):  # chat: the assistant's role, at once
                await resp.write(_events(opening))
            finish = None
            while finish is None:
                updates: list[Update] = [await rec.updates.get()]
                while not rec.updates.empty():  # what arrived meanwhile goes in one write
                    updates.append(rec.updates.get_nowait())
                out = []
                for update in updates:
                    finish = update.finish
                    if update.token is None:  # failed: an error event, then the end
                        out.append(_failure(rec).body())
                        break
                    out.append(bodies.chunk(rec, update))
                if finish is not None and include_usage and rec.error is None:
                    out.append(bodies.usage_chunk(rec))
                await resp.write(_events(out))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:  # the client closed the stream: finish_response aborts it
            log.info("%s: the client went away mid-stream", rec.request_id)
        return resp

    async def models(self, request: web.Request) -> web.Response:
        front = self.front
        model = {"id": front.cfg.model_name, "object": "model", "owned_by": "eep"}
        model["max_model_len"] = front.max_context  # prompt + max_tokens, at most
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        front = self.front
        live = front.live_slots()
        body = {
            "status": "ok" if live else "unavailable",
            "epoch": front.view.epoch if front.view else 0,
            "live_slots": live,
            "num_slots": front.cfg.num_slots,
        }
        return web.json_response(body, status=200 if live else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def debug_slots(self, request: web.Request) -> web.Response:
        return web.json_response(self.front.slots_state())

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every error answered with an OpenAI-style body, and counted by reason."""
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.reason is not None:
                self.front.rejected[exc.reason] += 1
            return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
        except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, too large
            if exc.status < 400:
                raise
            reason = {413: "too_large", 404: "not_found", 405: "not_found"}.get(exc.status)
            self.front.rejected[reason or "invalid"] += 1
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            body = error_body(f"{exc.reason}: {request.method} {request.path}", INVALID)
            return web.json_response(body, status=exc.status, headers=headers)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            body = error_body("internal error; see the front-end's log", "server_error")
            return web.json_response(body, status=500)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self.errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/debug/slots", self.debug_slots)
        return app


def _events(bodies: list[dict]) -> bytes:
    """Server-sent events, one per JSON body."""
    return "".join(f"data: {json.dumps(b)}\n\n" for b in bodies).encode()


def _failure(rec: Record) -> ApiError:
    """What the client of a request that failed in the log is told: 400 when every rank
    refused it (it cannot run here), 500 when it was quarantined (ranks died under it)."""
    if rec.error_code == "refused":
        return ApiError(400, rec.error or "refused", code="refused", reason=None)
    return ApiError(
        500, rec.error or "failed", kind="server_error", code=rec.error_code, reason=None
    )
