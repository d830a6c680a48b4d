"""Incremental detokenization and stop strings (eep.frontend.detokenize), on real tokenizers
made here: the byte tokenizer, a byte-level BPE (as Qwen3 ships) and a byte-fallback BPE (as
sentencepiece models ship), over random token sequences, multi-byte characters and lone bytes
included. The streamed pieces must add up to the tokenizer's decode of all the tokens."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eep.frontend.detokenize import IncrementalDetokenizer, StopMatcher, TextStream
from eep.frontend.tokenizer import ByteTokenizer, HFTokenizer
from eep.tools.toy_tokenizer import train_byte_level, training_files

VOCAB = 512
TEXTS = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\ufffd")
    | st.sampled_from("é☃😀ß中"),
    max_size=6,
)


def _hf(tok, eos: str) -> HFTokenizer:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)
    return HFTokenizer(fast, (fast.eos_token_id,))


def _byte_fallback():
    """A sentencepiece-style BPE: ``▁`` for spaces, and characters outside its small alphabet
    as ``<0xNN>`` byte pieces, which its decoder joins into one run."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        limit_alphabet=60,
        show_progress=False,
    )
    tok.train(training_files()[:8], trainer)
    spec = json.loads(tok.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    return _hf(Tokenizer.from_str(json.dumps(spec)), "</s>")


@pytest.fixture(scope="module", params=["bytes", "byte_level", "byte_fallback"])
def tokenizer(request):
    if request.param == "bytes":
        return ByteTokenizer(VOCAB)
    if request.param == "byte_level":
        return _hf(train_byte_level(VOCAB), "<|im_end|>")
    return _byte_fallback()


def _size(tok) -> int:
    return VOCAB if isinstance(tok, ByteTokenizer) else len(tok._tok)


def _ids(data, tok) -> list[int]:
    """Random ids, byte pieces and whole encoded texts (multi-byte characters), mixed."""
    parts = st.one_of(
        st.integers(0, _size(tok) - 1).map(lambda i: [i]),
        st.sampled_from(sorted(tok.byte_tokens) or [0]).map(lambda i: [i]),
        TEXTS.map(tok.encode),
    )
    chunks = data.draw(st.lists(parts, min_size=1, max_size=12))
    return [i for c in chunks for i in c] or [0]


def _streamed(tok, ids: list[int], last: str = "length", stops=()) -> tuple[list[str], bool]:
    stream = TextStream(tok, stops)
    pieces, stopped = [], False
    for n, token in enumerate(ids):
        piece, stopped = stream.push(token, last if n == len(ids) - 1 else None)
        pieces.append(piece)
        if stopped:
            break
    assert "".join(pieces) == stream.text
    return pieces, stopped


SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(data=st.data())
def test_streamed_pieces_add_up_to_the_decode_of_every_token(tokenizer, data):
    ids = _ids(data, tokenizer)
    pieces, _ = _streamed(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)


@SETTINGS
@given(data=st.data())
def test_a_stop_token_adds_no_text(tokenizer, data):
    ids = _ids(data, tokenizer) + [3]
    pieces, _ = _streamed(tokenizer, ids, last="stop")
    assert "".join(pieces) == tokenizer.decode(ids[:-1])


@SETTINGS
@given(data=st.data())
def test_text_that_encodes_whole_characters_streams_them_whole(tokenizer, data):
    text = data.draw(st.lists(TEXTS, max_size=5).map("".join))
    ids = tokenizer.encode(text) + tokenizer.encode("x")
    pieces, _ = _streamed(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces), pieces


def test_a_character_split_over_byte_level_tokens_comes_out_whole():
    tok = _hf(train_byte_level(VOCAB), "<|im_end|>")
    # the byte-level alphabet writes byte b as one symbol; ☃ is E2 98 83
    symbols = {v: k for k, v in tok._tok.get_vocab().items()}
    byte_ids = [tok._tok.convert_tokens_to_ids(_byte_symbol(b)) for b in "☃".encode()]
    assert all(i in symbols for i in byte_ids)
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in byte_ids] == ["", "", "☃"]


def _byte_symbol(b: int) -> str:
    """GPT-2's printable stand-in for byte ``b`` (tokenizers' ByteLevel alphabet)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def test_byte_fallback_pieces_are_held_until_their_run_ends():
    tok = _byte_fallback()
    ids = tok.encode("a é")
    assert any(i in tok.byte_tokens for i in ids)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == "a é" and "\ufffd" not in "".join(pieces)


# --- stop strings -------------------------------------------------------------------------

PIECES = st.lists(st.text(alphabet="abc\u00e9\n", max_size=4), max_size=12)
STOPS = st.lists(st.text(alphabet="abc\u00e9\n", min_size=1, max_size=4), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(pieces=PIECES, stops=STOPS)
def test_the_stop_matcher_cuts_at_the_first_stop_string_across_pieces(pieces, stops):
    matcher = StopMatcher(tuple(stops))
    out, stopped = [], False
    for piece in pieces:
        released, stopped = matcher.push(piece)
        out.append(released)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    full = "".join(pieces)
    hits = [i for s in stops if (i := full.find(s)) >= 0]
    assert stopped == bool(hits)
    assert "".join(out) == (full[: min(hits)] if hits else full)


def test_what_may_begin_a_stop_string_is_held_back_then_released():
    matcher = StopMatcher(("END",))
    assert matcher.push("the E") == ("the ", False)  # "E" may begin "END"
    assert matcher.push("N") == ("", False)
    assert matcher.push("D!") == ("", True)
    matcher = StopMatcher(("END",))
    assert matcher.push("the EN") == ("the ", False)
    assert matcher.push("d") == ("ENd", False)  # no stop after all: released


def test_a_stop_string_ends_the_text_and_a_stream_without_one_flushes_at_the_end():
    tok = ByteTokenizer(VOCAB)
    pieces, stopped = _streamed(tok, list(b"hello world"), stops=("o w",))
    assert stopped and "".join(pieces) == "hell"
    pieces, stopped = _streamed(tok, list(b"hello wo"), stops=("o wx",))
    assert not stopped and "".join(pieces) == "hello wo" and pieces[-1] == "o wo"
