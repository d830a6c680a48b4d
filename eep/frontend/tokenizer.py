"""A byte-level tokenizer for models served without one (random-weight checkpoints).

Text becomes its UTF-8 bytes (ids 0-255); ids of 256 and above decode as ``<|id|>``. Prompts
may also be given as token ids (the OpenAI API allows a list of integers).
"""

from __future__ import annotations


class ByteTokenizer:
    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"a byte tokenizer needs a vocabulary of >= 256, got {vocab_size}.")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``; ValueError when it is not valid Unicode (JSON can
        carry a lone surrogate, ``"\\ud800"``, that has no UTF-8 form)."""
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
                f"{exc.start}"
            ) from None

    def decode(self, ids: list[int]) -> str:
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
