"""The front-end's tokenizer: the checkpoint's own when it ships one, else byte-level.

A model directory with ``tokenizer.json`` and ``tokenizer_config.json`` (a Hugging Face
checkpoint) is served with that tokenizer, loaded by transformers' ``PreTrainedTokenizerFast``
(its chat template, special tokens and decoder as the checkpoint defines them). transformers
takes about a second to import, so it is imported only then: a front-end serving a random-weight
model without a tokenizer starts as quickly as before, and none imports torch.

Without one, :class:`ByteTokenizer`: text becomes its UTF-8 bytes (ids 0-255); ids of 256 and
above decode as ``<|id|>``; there is no chat template.

Either way the end-of-sequence ids come from the directory's ``generation_config.json``
(``eos_token_id``, one id or a list), else from the tokenizer's ``eos_token``. Prompts may
also be given as token ids (the OpenAI API allows a list of integers).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GENERATION_CONFIG = "generation_config.json"


class NoChatTemplate(ValueError):
    """The model has no chat template: chat completions cannot be served."""


class TokenizerError(Exception):
    """A model directory whose tokenizer or generation config cannot be read."""


class Tokenizer(Protocol):
    """What the front-end needs of a tokenizer."""

    name: str
    eos_token_ids: tuple[int, ...]
    # ids whose text depends on their neighbours (byte-fallback ``<0xNN>`` pieces are decoded
    # as one run): the incremental detokenizer holds text back while one ends the sequence
    byte_tokens: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]: ...


def check_text(text: str) -> None:
    """ValueError when ``text`` is not valid Unicode (JSON can carry a lone surrogate,
    ``"\\ud800"``, that has no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"is not valid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start}"
        ) from None


class ByteTokenizer:
    name = "bytes"
    byte_tokens: frozenset[int] = frozenset()

    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...] = ()):
        if vocab_size < 256:
            raise ValueError(f"a byte tokenizer needs a vocabulary of >= 256, got {vocab_size}.")
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``; ValueError when it is not valid Unicode."""
        check_text(text)
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            out.append(f"<|{i}|>")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        raise NoChatTemplate(
            "this model has no chat template (its directory has no tokenizer_config.json with "
            "one): use /v1/completions with a prompt"
        )


class HFTokenizer:
    """A checkpoint's tokenizer, through transformers (imported by :func:`load_tokenizer`)."""

    name = "huggingface"

    def __init__(self, tok: Any, eos_token_ids: tuple[int, ...]):
        self._tok = tok
        self.eos_token_ids = eos_token_ids
        self.byte_tokens = frozenset(
            i for t, i in tok.get_vocab().items() if len(t) == 6 and t[:3] == "<0x" and t[5] == ">"
        )

    def encode(self, text: str) -> list[int]:
        check_text(text)
        return list(self._tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        # the backend's own decoder, without transformers' space clean-up: what an
        # incremental decode over windows of tokens can reproduce exactly
        return self._tok.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids of ``messages`` under the checkpoint's chat template, with the
        assistant's turn opened. NoChatTemplate when there is none; ValueError when the
        template refuses the messages (it may raise, e.g. on roles out of order)."""
        if not self._tok.chat_template:
            raise NoChatTemplate(
                "this model's tokenizer has no chat template: use /v1/completions with a prompt"
            )
        for m in messages:
            check_text(m.get("content") or "")
        try:
            text = self._tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja2's TemplateError, or a raise_exception() in it
            raise ValueError(f"the model's chat template refused the messages: {exc}") from None
        # the template writes the special tokens itself (a BOS among them, where it has one)
        return list(self._tok.encode(text, add_special_tokens=False))


def has_tokenizer(model_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: str, vocab_size: int) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of the model in ``model_dir``: its own if it ships one, else bytes.
    TokenizerError names a file that is there but cannot be read."""
    gen_eos = generation_eos_ids(model_dir)
    if not has_tokenizer(model_dir):
        return ByteTokenizer(vocab_size, gen_eos or ())
    try:
        from transformers import PreTrainedTokenizerFast  # ~1 s; no torch
    except ImportError as exc:
        raise TokenizerError(
            f"{model_dir} ships a tokenizer, and serving it needs transformers and tokenizers "
            f"(pip install -r requirements/cpu.txt): {exc}"
        ) from exc
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise TokenizerError(
            f"{model_dir}: its tokenizer (tokenizer.json, tokenizer_config.json) could not be "
            f"loaded: {exc}"
        ) from exc
    eos = gen_eos if gen_eos is not None else _tokenizer_eos(tok)
    log.info(
        "tokenizer of %s: %d tokens, end of sequence %s, chat template %s",
        model_dir,
        len(tok),
        list(eos),
        "yes" if tok.chat_template else "none",
    )
    return HFTokenizer(tok, eos)


def _tokenizer_eos(tok: Any) -> tuple[int, ...]:
    return () if tok.eos_token_id is None else (int(tok.eos_token_id),)


def generation_eos_ids(model_dir: str) -> tuple[int, ...] | None:
    """``eos_token_id`` of the directory's ``generation_config.json`` (one id or a list);
    None when there is no such file or field."""
    path = os.path.join(model_dir, GENERATION_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: not readable JSON ({exc}); fix or remove it") from exc
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    if eos is None:
        return None
    ids = eos if isinstance(eos, list) else [eos]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise TokenizerError(
            f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}"
        )
    return tuple(ids)
