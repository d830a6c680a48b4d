"""The OpenAI-compatible HTTP layer of the front-end: ``/v1/completions`` (streamed or not),
``/v1/models``, ``/health``, ``/metrics`` and ``/debug/slots``.

It validates a request, records it in the front-end's log, has it assigned, and answers from
the log's token stream; errors are 4xx with an OpenAI-style body that names the problem.
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from eep.protocol import SamplingParams

from .metrics import FrontendCollector
from .request_log import Record, RequestState

if TYPE_CHECKING:
    from .core import Frontend

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


class OpenAIApi:
    def __init__(self, front: Frontend):
        self.front = front
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FrontendCollector(front))

    def parse(self, body: dict) -> tuple[list[int], SamplingParams, bool]:
        front = self.front
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model", front.cfg.model_name)
        if model != front.cfg.model_name:
            raise UnknownModel(
                f"model {model!r} is not served here; this server has {front.cfg.model_name!r}"
            )
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = front.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
            ids = prompt
        else:
            raise BadRequest("'prompt' must be a string or a list of token ids")
        if not ids:
            raise BadRequest("'prompt' must not be empty")
        if any(not 0 <= t < front.vocab_size for t in ids):
            raise BadRequest(f"token ids must be in [0, {front.vocab_size})")
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
        self.front.log.add(rec)
        self.front.assign(rec)
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
            "model": self.front.cfg.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": self.front.tokenizer.decode(tokens),
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
        name = self.front.cfg.model_name
        return web.json_response(
            {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "eep"}]}
        )

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

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/debug/slots", self.debug_slots)
        return app


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
