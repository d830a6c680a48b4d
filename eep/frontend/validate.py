"""Requests of the OpenAI API checked and turned into what the front-end runs.

:func:`parse_completion` (``/v1/completions``) and :func:`parse_chat`
(``/v1/chat/completions``) return a :class:`Parsed`: the prompt's token ids, the
:class:`~eep.protocol.SamplingParams` the rank draws with, the stop strings the front-end
watches for, and how to answer. Anything wrong is an :class:`ApiError` that names the field
(``param``) and what is wrong with it. Unknown fields are ignored (clients send extras);
OpenAI fields whose non-default values EEP does not honour are refused, since a client that
asks for them must not get an answer that silently ignores them.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eep.membership.errors import strict_json
from eep.protocol import SamplingParams

from .tokenizer import NoChatTemplate

if TYPE_CHECKING:
    from .core import Frontend

MAX_SEED = 2**62
# a temperature below this is greedy (0), as vLLM takes it: the draw is greedy anyway, and
# logits divided by a denormal temperature overflow into a distribution that kills the rank
MIN_TEMPERATURE = 1e-5
MAX_STOPS = 16  # stop strings of one request (OpenAI takes 4)
MAX_STOP_CHARS = 1000
MAX_STOP_TOKEN_IDS = 256
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


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def unsupported(param: str, message: str, code: str = "unsupported") -> ApiError:
    return ApiError(400, message, param=param, code=code, reason="unsupported")


def show(value: Any) -> str:
    """``value`` as JSON (it came from JSON), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except RecursionError:  # nested about as deep as the decoder takes
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request: what the rank runs, what the front-end cuts, how to answer."""

    prompt: list[int]
    params: SamplingParams
    stop: tuple[str, ...]  # stop strings, watched for in the text at the front-end
    stream: bool
    include_usage: bool  # streamed: a last chunk with the usage (stream_options)


def decode_body(raw: bytes) -> Any:
    """The JSON value of a request body; 400 unless it is strict JSON (no NaN, no Infinity, no
    number that overflows a float)."""
    try:
        return strict_json(raw)
    except RecursionError:
        raise invalid("the body is not JSON this server takes: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        why = "a number has too many digits" if "int" in str(exc) and "digits" in str(exc) else exc
        raise invalid(f"the body is not JSON: {why}") from None


# OpenAI fields EEP does not honour: their default values pass, anything else is a 400
_COMMON_DEFAULTS: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "only n=1 is supported (send n requests, each with its own seed)"),
    "presence_penalty": ((0,), "'presence_penalty' is not supported (only 0)"),
    "frequency_penalty": ((0,), "'frequency_penalty' is not supported (only 0)"),
    "logit_bias": (({},), "'logit_bias' is not supported"),
}
_COMPLETION_DEFAULTS = _COMMON_DEFAULTS | {
    "best_of": ((1,), "only best_of=1 is supported"),
    "echo": ((False,), "'echo' is not supported"),
    "logprobs": ((), "'logprobs' is not supported"),
    "suffix": (("",), "'suffix' is not supported"),
}
_CHAT_DEFAULTS = _COMMON_DEFAULTS | {
    "logprobs": ((False,), "'logprobs' is not supported"),
    "top_logprobs": ((0,), "'top_logprobs' is not supported"),
    "tools": (([],), "'tools' are not supported"),
    "tool_choice": (("none",), "'tool_choice' is not supported"),
    "functions": (([],), "'functions' are not supported"),
    "function_call": (("none",), "'function_call' is not supported"),
    "response_format": (({"type": "text"},), "only response_format {'type': 'text'} is served"),
}


def parse_completion(body: Any, front: Frontend) -> Parsed:
    """A ``/v1/completions`` request: a prompt as text or token ids."""
    _check_object_and_model(body, front)
    ids = _prompt(body.get("prompt"), front)
    return _parse(body, front, ids, _COMPLETION_DEFAULTS, "max_tokens")


def parse_chat(body: Any, front: Frontend) -> Parsed:
    """A ``/v1/chat/completions`` request: messages, rendered by the model's chat template."""
    _check_object_and_model(body, front)
    messages = _messages(body.get("messages"))
    try:
        ids = front.tokenizer.chat_prompt(messages)
    except NoChatTemplate as exc:
        raise unsupported("messages", str(exc), code="no_chat_template") from None
    except ValueError as exc:
        raise invalid(f"'messages': {exc}", "messages") from None
    _check_ids(ids, front, "messages")
    newer = body.get("max_completion_tokens") is not None  # OpenAI's name for it in chat
    tokens_field = "max_completion_tokens" if newer else "max_tokens"
    return _parse(body, front, ids, _CHAT_DEFAULTS, tokens_field)


def _check_object_and_model(body: Any, front: Frontend) -> None:
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {show(model)}", "model")
    if model is not None and model != front.cfg.model_name:
        raise ApiError(
            404,
            f"model {show(model)} is not served here; this server has {front.cfg.model_name!r}",
            param="model",
            code="model_not_found",
            reason="unknown_model",
        )


def _parse(body: dict, front: Frontend, ids: list[int], defaults: dict, tokens_field: str):
    for name, (allowed, message) in defaults.items():
        value = body.get(name)
        if value is not None and not any(_same(value, a) for a in allowed):
            raise unsupported(name, f"{message}; got {show(value)}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid(f"'stream' must be true or false, got {show(stream)}", "stream")
    include_usage = _stream_options(body.get("stream_options"))
    max_tokens = _fit_context(len(ids), _int(body, tokens_field, 1, None), front.max_context)
    seed = _int(body, "seed", 0, MAX_SEED)
    temperature = _num(body, "temperature", 0.0, 0.0, 2.0, low_open=False)
    top_k = _int(body, "top_k", -1, None)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=secrets.randbits(31) if seed is None else seed,
        stop_token_ids=_stop_token_ids(body, front),
        top_k=max(top_k or 0, 0),  # -1, as vLLM takes it, and 0: no limit
    )
    return Parsed(ids, params, _stop(body.get("stop")), bool(stream), include_usage)


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
            raise unsupported("prompt", "one prompt per request: send a batch as requests")
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        try:
            ids = front.tokenizer.encode(prompt)
        except ValueError as exc:
            raise invalid(f"'prompt' {exc}", "prompt") from None
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        ids = prompt
    else:
        raise invalid(
            f"'prompt' must be a string or a list of token ids (integers), got {show(prompt)}",
            "prompt",
        )
    _check_ids(ids, front, "prompt")
    return ids


def _check_ids(ids: list[int], front: Frontend, param: str) -> None:
    if not ids:
        raise invalid(f"'{param}' must not be empty", param)
    for i, t in enumerate(ids):
        if not 0 <= t < front.vocab_size:
            raise invalid(
                f"token ids must be in [0, {front.vocab_size}); got {show(t)} at position {i}",
                param,
            )


def _messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as the chat template takes them: role and content strings (text parts
    joined by newlines), and ``name`` where given."""
    if not isinstance(messages, list) or not messages:
        raise invalid(
            f"'messages' must be a non-empty list of {{role, content}} objects, got "
            f"{show(messages)}",
            "messages",
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise invalid(
                f"'{where}' must be an object with a 'role' string, got {show(m)}", "messages"
            )
        message = {"role": m["role"], "content": _content(m.get("content"), where)}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


def _content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise unsupported(
                    "messages", f"'{where}.content': only text parts are served, got {show(part)}"
                )
            if not isinstance(part.get("text"), str):
                raise invalid(f"'{where}.content': a text part needs a 'text' string", "messages")
            parts.append(part["text"])
        return "\n".join(parts)
    raise invalid(
        f"'{where}.content' must be a string or a list of text parts, got {show(content)}",
        "messages",
    )


def _stop(stop: Any) -> tuple[str, ...]:
    """``stop``: a string or a list of strings; empty ones are no stop."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"'stop' must be a string or a list of strings, got {show(stop)}", "stop")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid(
            f"'stop' takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
            "stop",
        )
    return tuple(dict.fromkeys(s for s in stops if s))


def _stop_token_ids(body: dict, front: Frontend) -> tuple[int, ...]:
    """The request's ``stop_token_ids`` and, unless ``ignore_eos``, the model's EOS ids."""
    ids = body.get("stop_token_ids")
    if ids is None:
        ids = []
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_STOP_TOKEN_IDS
        or not all(type(t) is int and 0 <= t < front.vocab_size for t in ids)
    ):
        raise invalid(
            f"'stop_token_ids' must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in "
            f"[0, {front.vocab_size}), got {show(ids)}",
            "stop_token_ids",
        )
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise invalid(f"'ignore_eos' must be true or false, got {show(ignore_eos)}", "ignore_eos")
    eos = () if ignore_eos else front.tokenizer.eos_token_ids
    return tuple(dict.fromkeys([*ids, *eos]))


def _stream_options(options: Any) -> bool:
    """``include_usage`` of ``stream_options`` (the only option served)."""
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid(f"'stream_options' must be an object, got {show(options)}", "stream_options")
    other = sorted(set(options) - {"include_usage"})
    if other:
        raise unsupported("stream_options", f"'stream_options' {other} are not supported")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise invalid(f"'include_usage' must be true or false, got {show(usage)}", "stream_options")
    return bool(usage)


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
        raise invalid(f"'{name}' must be an integer {span}, got {show(value)}", name)
    return value


def _num(body: dict, name: str, default: float, lo: float, hi: float, low_open: bool) -> float:
    value = body.get(name)
    if value is None:
        return default
    low_ok = type(value) in (int, float) and (value > lo if low_open else value >= lo)
    if not low_ok or not value <= hi:
        span = f"({lo:g}, {hi:g}]" if low_open else f"[{lo:g}, {hi:g}]"
        raise invalid(f"'{name}' must be a number in {span}, got {show(value)}", name)
    return float(value)
