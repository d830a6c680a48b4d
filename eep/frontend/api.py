"""The OpenAI-compatible HTTP layer of the front-end: ``/v1/completions`` (streamed or not),
``/v1/models``, ``/health``, ``/metrics`` and ``/debug/slots``.

It validates a request (:func:`parse_request`), admits it into the front-end's log, and
answers from the log's token stream. Every error is a JSON body
``{"error": {"message", "type", "param", "code"}}`` that names the problem: 400 for a body
that is not valid (or asks for more context than the model has), 404 for another model or
route, 413 for a body over 16 MiB, 429 with ``Retry-After`` when the queue is full. A client
that goes away aborts its request (the app runs with ``handler_cancellation``), and a
request's record is dropped once its response is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from eep.membership.errors import strict_json
from eep.protocol import SamplingParams

from .metrics import FrontendCollector
from .request_log import Record, RequestState

if TYPE_CHECKING:
    from .core import Frontend

log = logging.getLogger("eep.frontend.api")
MAX_BODY = 16 << 20
MAX_SEED = 2**62
# a temperature below this is greedy (0), as vLLM takes it: the draw is greedy anyway, and
# logits divided by a denormal temperature overflow into a distribution that kills the rank
MIN_TEMPERATURE = 1e-5
INVALID = "invalid_request_error"


class ApiError(Exception):
    """An answer other than 200, with an OpenAI-style body. ``reason`` labels
    ``eep_rejected_total`` (None: not a rejection at the door, e.g. a request that failed)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        reason: str | None = "invalid",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.reason, self.headers = param, code, reason, headers

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported", reason="unsupported")


def _show(value: Any) -> str:
    """``value`` as JSON (it came from JSON), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except RecursionError:  # nested about as deep as the decoder takes
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


# --- parsing ------------------------------------------------------------------------------


def decode_body(raw: bytes) -> Any:
    """The JSON value of a request body; 400 unless it is strict JSON (no NaN, no Infinity, no
    number that overflows a float)."""
    try:
        return strict_json(raw)
    except RecursionError:
        raise _invalid("the body is not JSON this server takes: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        why = "a number has too many digits" if "int" in str(exc) and "digits" in str(exc) else exc
        raise _invalid(f"the body is not JSON: {why}") from None


# OpenAI fields EEP does not honour: their default values pass, anything else is a 400
_DEFAULTS_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "only n=1 is supported"),
    "best_of": ((1,), "only best_of=1 is supported"),
    "echo": ((False,), "'echo' is not supported"),
    "logprobs": ((), "'logprobs' is not supported"),
    "stop": (("", []), "'stop' sequences are not supported"),
    "suffix": (("",), "'suffix' is not supported"),
    "presence_penalty": ((0,), "'presence_penalty' is not supported (only 0)"),
    "frequency_penalty": ((0,), "'frequency_penalty' is not supported (only 0)"),
    "logit_bias": (({},), "'logit_bias' is not supported"),
    "stream_options": (({}, {"include_usage": False}), "'stream_options' are not supported"),
}


def parse_request(body: Any, front: Frontend) -> tuple[list[int], SamplingParams, bool]:
    """``(prompt ids, sampling parameters, stream)`` of a completion request; :class:`ApiError`
    names what is wrong. Unknown fields are ignored (clients send extras); OpenAI fields whose
    non-default values EEP does not honour are refused."""
    if not isinstance(body, dict):
        raise _invalid(f"the request body must be a JSON object, not {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid(f"'model' must be a string, got {_show(model)}", "model")
    if model is not None and model != front.cfg.model_name:
        raise ApiError(
            404,
            f"model {_show(model)} is not served here; this server has {front.cfg.model_name!r}",
            param="model",
            code="model_not_found",
            reason="unknown_model",
        )
    ids = _prompt(body.get("prompt"), front)
    for name, (allowed, message) in _DEFAULTS_ONLY.items():
        value = body.get(name)
        if value is not None and not any(_same(value, a) for a in allowed):
            raise _unsupported(name, f"{message}; got {_show(value)}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid(f"'stream' must be true or false, got {_show(stream)}", "stream")
    max_tokens = _int(body, "max_tokens", 1, None)
    max_tokens = _fit_context(len(ids), max_tokens, front.max_context)
    seed = _int(body, "seed", 0, MAX_SEED)
    temperature = _num(body, "temperature", 0.0, 0.0, 2.0, low_open=False)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=secrets.randbits(31) if seed is None else seed,
    )
    return ids, params, bool(stream)


def _same(value: Any, allowed: Any) -> bool:
    """``value`` equals ``allowed`` with the same JSON type (``false`` is not ``0``)."""
    if isinstance(allowed, bool) or isinstance(value, bool):
        return type(value) is type(allowed) and value == allowed
    if isinstance(allowed, int):
        return type(value) in (int, float) and value == allowed
    return type(value) is type(allowed) and value == allowed


def _prompt(prompt: Any, front: Frontend) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise _unsupported("prompt", "one prompt per request: send a batch as requests")
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        try:
            ids = front.tokenizer.encode(prompt)
        except ValueError as exc:
            raise _invalid(f"'prompt' {exc}", "prompt") from None
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        ids = prompt
    else:
        raise _invalid(
            f"'prompt' must be a string or a list of token ids (integers), got {_show(prompt)}",
            "prompt",
        )
    if not ids:
        raise _invalid("'prompt' must not be empty", "prompt")
    for i, t in enumerate(ids):
        if not 0 <= t < front.vocab_size:
            raise _invalid(
                f"token ids must be in [0, {front.vocab_size}); got {_show(t)} at position {i}",
                "prompt",
            )
    return ids


def _fit_context(prompt: int, max_tokens: int | None, limit: int) -> int:
    """``max_tokens`` checked against the context limit; None: the rest of the context."""
    if max_tokens is None and prompt < limit:
        return limit - prompt
    if max_tokens is not None and prompt + max_tokens <= limit:
        return max_tokens
    message = f"this model's maximum context length is {limit} tokens; "
    if max_tokens is None:
        message += f"the prompt alone has {prompt} tokens, which leaves none to generate"
    else:
        message += (
            f"you asked for {prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} "
            "to generate)"
        )
    param = "prompt" if max_tokens is None else "max_tokens"
    raise ApiError(
        400, message, param=param, code="context_length_exceeded", reason="context_length"
    )


def _int(body: dict, name: str, lo: int, hi: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or value < lo or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _invalid(f"'{name}' must be an integer {span}, got {_show(value)}", name)
    return value


def _num(body: dict, name: str, default: float, lo: float, hi: float, low_open: bool) -> float:
    value = body.get(name)
    if value is None:
        return default
    low_ok = type(value) in (int, float) and (value > lo if low_open else value >= lo)
    if not low_ok or not value <= hi:
        span = f"({lo:g}, {hi:g}]" if low_open else f"[{lo:g}, {hi:g}]"
        raise _invalid(f"'{name}' must be a number in {span}, got {_show(value)}", name)
    return float(value)


# --- the HTTP layer -----------------------------------------------------------------------


class OpenAIApi:
    def __init__(self, front: Frontend):
        self.front = front
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FrontendCollector(front))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        front = self.front
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(
                413, f"the body is over {MAX_BODY} bytes", code="too_large", reason="too_large"
            ) from None
        ids, params, stream = parse_request(decode_body(raw), front)
        rec = Record(f"cmpl-{uuid.uuid4().hex[:24]}", ids, params)
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
            if stream:
                return await self._stream(request, rec)
            while rec.state is not RequestState.FINISHED:
                await rec.updates.get()
            if rec.error is not None:
                raise _failure(rec)
            return web.json_response(self._completion(rec, rec.emitted, rec.finish_reason))
        finally:  # answered, failed, or the client went away (the handler is cancelled)
            front.finish_response(rec)

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
        try:
            await resp.prepare(request)
            finish = None
            while finish is None:
                events = [await rec.updates.get()]
                while not rec.updates.empty():  # what arrived meanwhile goes in one write
                    events.append(rec.updates.get_nowait())
                chunks = []
                for token, finish in events:
                    if token is None:  # failed: an error event, then the end of the stream
                        chunks.append(json.dumps(_failure(rec).body()))
                        break
                    chunks.append(json.dumps(self._completion(rec, [token], finish)))
                await resp.write("".join(f"data: {c}\n\n" for c in chunks).encode())
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
            return exc.response()
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
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/debug/slots", self.debug_slots)
        return app


def _failure(rec: Record) -> ApiError:
    """What the client of a request that failed in the log is told: 400 when every rank
    refused it (it cannot run here), 500 when it was quarantined (ranks died under it)."""
    if rec.error_code == "refused":
        return ApiError(400, rec.error or "refused", code="refused", reason=None)
    return ApiError(
        500, rec.error or "failed", kind="server_error", code=rec.error_code, reason=None
    )
