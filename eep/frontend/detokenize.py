"""Token ids to text, one token at a time, and the stop strings that end a request.

Pure (no I/O): the request log runs a :class:`TextStream` per request as its tokens are
accepted, and both the streamed and the whole answer are made of the pieces it releases, so a
stream's concatenated pieces are the non-streamed text byte for byte, whatever the tokenizer.
The pieces depend only on the request's tokens, which a re-queue onto another rank does not
change (greedy, or draws seeded by ``(seed, index)``), so a stop string ends the request at
the same token, with the same text, whether or not a rank died under it.

**Incremental detokenization** (:class:`IncrementalDetokenizer`). Decoding each token alone
breaks what spans tokens: a character whose UTF-8 bytes are split over byte-level tokens,
byte-fallback pieces (``<0x..>``, decoded as one run), a leading space a decoder strips from
the first token only. So the text is decoded over a window of tokens, ``ids[prefix:]``, and
what it adds to ``ids[prefix:read]`` is released, unless it ends in U+FFFD (a character not
complete yet) or the last token with text is a byte-fallback piece (the run may go on: the
decoder joins the pieces of a run, and writes U+FFFD for each of a run that is not UTF-8, so
one more piece can change the text of the ones before it); then nothing is
released and the window grows. After a release the window starts where the last one read
from, so the decoder sees the context it needs. At the end the rest is released whatever it
holds. For byte-level BPE, byte-fallback and byte tokenizers this equals decoding all the
tokens at once (the unit tests check it over random token sequences).

**Stop strings** (:class:`StopMatcher`). The released text is searched for every stop string,
across piece boundaries. The longest tail of the text that could still begin a stop string is
held back from the stream until the next piece settles it; at a match the text before it is
released, the stop string and what follows are not, and the request ends (``stop``). A token
that ended the request on the rank (a stop token id: the model's end of sequence or one the
request named) adds no text.
"""

from __future__ import annotations

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of a growing token sequence, released in pieces whose concatenation is the text
    of the whole (see the module's docstring)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # the decode window starts here
        self.read = 0  # the text of ids[:read] is released
        self._before: str | None = None  # decode(ids[prefix:read]), until the window moves
        self._in_run = False  # the last token with text was a byte-fallback piece

    def push(self, token: int) -> str:
        """Add ``token``; the text it completes (often ``""`` while a character is split)."""
        self.ids.append(token)
        if token in self.tokenizer.byte_tokens:
            self._in_run = True
        elif self._in_run:
            # a token without text (a special token the decode skips) does not end the run
            self._in_run = self.tokenizer.decode([token]) == ""
        if self._in_run:
            return ""
        return self._release(final=False)

    def flush(self) -> str:
        """Everything not yet released (the sequence has ended)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._before is None:
            self._before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        before = self._before
        after = self.tokenizer.decode(self.ids[self.prefix :])
        grown = len(after) > len(before) and after.startswith(before)
        settled = grown and not after.endswith(REPLACEMENT)
        if not (settled or final):
            return ""
        self.prefix, self.read, self._before = self.read, len(self.ids), None
        return after[len(before) :]


class StopMatcher:
    """Finds the first stop string in text fed piece by piece; holds back what may begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""  # the tail that may be the start of a stop string

    def push(self, text: str) -> tuple[str, bool]:
        """``(text to release, stopped)``: at a stop string, the text before it and True."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = self._partial(buf)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _partial(self, buf: str) -> int:
        """The length of the longest tail of ``buf`` that is a proper prefix of a stop."""
        longest = min(len(buf), max(len(s) for s in self.stops) - 1)
        for k in range(longest, 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class TextStream:
    """A request's text: its tokens detokenized, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = ()):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.matcher = StopMatcher(stops)
        self.pieces: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def push(self, token: int, finish: str | None) -> tuple[str, bool]:
        """Feed the request's next token; ``finish`` is the rank's finish reason for it
        (``stop``: it is a stop token and adds no text). Returns the text to release and
        whether a stop string ends the request at this token."""
        assert not self.stopped, "a request that hit a stop string takes no more tokens"
        text = "" if finish == "stop" else self.detok.push(token)
        if finish is not None:
            text += self.detok.flush()
        out, self.stopped = self.matcher.push(text)
        if finish is not None and not self.stopped:
            out += self.matcher.flush()
        self.pieces.append(out)
        return out, self.stopped
