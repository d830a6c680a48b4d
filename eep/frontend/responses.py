"""The JSON bodies of answers: text completions and chat completions, whole or as stream chunks.

Every choice carries the text the request log released (:class:`~.request_log.Update`), so a
stream's pieces add up to the whole answer's text, and its ``token_ids`` (an EEP extension:
what the ranks emitted, stop tokens and the token that completed a stop string included).
A stream sends one chunk per token, whose text may be empty while a character or a possible
stop string is incomplete; chat streams open with the assistant's role. ``usage`` counts the
prompt's tokens and the tokens emitted.
"""

from __future__ import annotations

from typing import Any

from .request_log import Record, Update


def usage(rec: Record) -> dict[str, int]:
    prompt, completion = len(rec.prompt), len(rec.emitted)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class CompletionBodies:
    """``/v1/completions``: ``text_completion`` objects, whole and streamed."""

    def __init__(self, model: str):
        self.model = model

    def _body(self, rec: Record, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": rec.request_id,
            "object": "text_completion",
            "created": int(rec.created),
            "model": self.model,
            "choices": [choice],
        }

    def whole(self, rec: Record) -> dict[str, Any]:
        text = rec.text.text if rec.text is not None else ""
        choice = _choice(text, rec.emitted, rec.finish_reason)
        return self._body(rec, choice) | {"usage": usage(rec)}

    def opening(self, rec: Record) -> list[dict[str, Any]]:
        return []

    def chunk(self, rec: Record, update: Update) -> dict[str, Any]:
        return self._body(rec, _choice(update.text, [update.token], update.finish))

    def usage_chunk(self, rec: Record) -> dict[str, Any]:
        return self._body(rec, {}) | {"choices": [], "usage": usage(rec)}


def _choice(text: str, tokens: list[int], finish: str | None) -> dict[str, Any]:
    return {
        "index": 0,
        "text": text,
        "token_ids": tokens,
        "finish_reason": finish,
        "logprobs": None,
    }


class ChatBodies:
    """``/v1/chat/completions``: ``chat.completion`` and ``chat.completion.chunk`` objects."""

    def __init__(self, model: str):
        self.model = model

    def _body(self, rec: Record, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": rec.request_id,
            "object": kind,
            "created": int(rec.created),
            "model": self.model,
            "choices": choices,
        }

    def whole(self, rec: Record) -> dict[str, Any]:
        text = rec.text.text if rec.text is not None else ""
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": rec.finish_reason,
            "logprobs": None,
            "token_ids": rec.emitted,
        }
        return self._body(rec, "chat.completion", [choice]) | {"usage": usage(rec)}

    def opening(self, rec: Record) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        return [self._chunk(rec, delta, None, [])]

    def chunk(self, rec: Record, update: Update) -> dict[str, Any]:
        return self._chunk(rec, {"content": update.text}, update.finish, [update.token])

    def _chunk(self, rec: Record, delta: dict, finish: str | None, tokens: list[int]) -> dict:
        choice = {
            "index": 0,
            "delta": delta,
            "finish_reason": finish,
            "logprobs": None,
            "token_ids": tokens,
        }
        return self._body(rec, "chat.completion.chunk", [choice])

    def usage_chunk(self, rec: Record) -> dict[str, Any]:
        return self._body(rec, "chat.completion.chunk", []) | {"usage": usage(rec)}
