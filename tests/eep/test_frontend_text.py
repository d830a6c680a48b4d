"""The front-end's text side without a cluster: the checkpoint's tokenizer and chat template
(eep.frontend.tokenizer), request validation of chat, stop strings and sampling fields
(eep.frontend.validate), and a stop string ending a request in the log (eep.frontend.core)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from eep.config import RuntimeConfig
from eep.frontend.core import Frontend
from eep.frontend.detokenize import TextStream
from eep.frontend.request_log import Record, RequestState
from eep.frontend.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    NoChatTemplate,
    TokenizerError,
    load_tokenizer,
)
from eep.frontend.validate import ApiError, parse_chat, parse_completion
from eep.membership.view import View
from eep.protocol import Abort, SamplingParams, Tokens
from eep.tools.toy_tokenizer import write_generation_config, write_tokenizer

from .test_api_frontend import Links

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A directory laid out as a Qwen3 checkpoint's tokenizer files (no weights needed)."""
    path = tmp_path_factory.mktemp("toy-tokenizer")
    write_tokenizer(str(path), VOCAB)
    return str(path)


@pytest.fixture(scope="module")
def hf(model_dir) -> HFTokenizer:
    return load_tokenizer(model_dir, VOCAB)


def _front(tokenizer=None) -> Frontend:
    cfg = RuntimeConfig("c", "/m", 2, 8, kv_blocks=8, block_size=16)
    front = Frontend(cfg, vocab_size=VOCAB, max_positions=1000, tokenizer=tokenizer)
    front.links = Links({0: 1, 1: 1})
    front.on_view(View(1, (0, 1), ((0, 1), (1, 1))))
    return front


def test_a_checkpoint_tokenizer_is_loaded_with_its_template_and_generation_eos(model_dir, hf):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(hf, HFTokenizer)
    ref = PreTrainedTokenizerFast.from_pretrained(model_dir)
    assert hf.eos_token_ids == (ref.convert_tokens_to_ids("<|im_end|>"), 0)
    messages = [{"role": "system", "content": "Sé brief."}, {"role": "user", "content": "Grüße ☃"}]
    text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "Grüße ☃" in text
    assert hf.chat_prompt(messages) == ref.encode(text, add_special_tokens=False)
    assert hf.decode(hf.encode("héllo, wörld 😀")) == "héllo, wörld 😀"
    assert hf.decode(hf.chat_prompt(messages)) == "system\nSé brief.\nuser\nGrüße ☃\nassistant\n"


def test_loading_a_tokenizer_imports_no_torch(model_dir):
    code = (
        "import sys; from eep.frontend.tokenizer import load_tokenizer; "
        f"t = load_tokenizer({model_dir!r}, {VOCAB}); "
        "assert type(t).__name__ == 'HFTokenizer'; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_directory_without_a_tokenizer_gets_bytes_and_no_chat(tmp_path):
    tok = load_tokenizer(str(tmp_path), VOCAB)
    assert isinstance(tok, ByteTokenizer) and tok.eos_token_ids == ()
    with pytest.raises(NoChatTemplate):
        tok.chat_prompt([{"role": "user", "content": "hi"}])
    write_generation_config(str(tmp_path), [7])
    assert load_tokenizer(str(tmp_path), VOCAB).eos_token_ids == (7,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(TokenizerError, match="eos_token_id must be"):
        load_tokenizer(str(tmp_path), VOCAB)


def test_a_chat_of_a_model_without_a_template_is_a_400_that_says_so():
    with pytest.raises(ApiError) as err:
        parse_chat({"messages": [{"role": "user", "content": "hi"}]}, _front())
    assert err.value.status == 400 and err.value.code == "no_chat_template"
    assert "no chat template" in err.value.message and err.value.param == "messages"


def test_a_chat_renders_its_messages_with_the_template_and_takes_sampling_fields(hf):
    front = _front(hf)
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Grüße"}]}],
        "max_completion_tokens": 9,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.9,
        "seed": 5,
        "stop": ["\n\n", "END"],
        "stop_token_ids": [7],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = parse_chat(body, front)
    assert req.prompt == hf.chat_prompt([{"role": "user", "content": "Grüße"}])
    assert req.params == SamplingParams(
        max_tokens=9, temperature=0.7, top_p=0.9, seed=5, top_k=20, stop_token_ids=(7, 2, 0)
    )
    assert req.stop == ("\n\n", "END") and req.stream and req.include_usage
    ignore = parse_completion({"prompt": "x", "ignore_eos": True, "top_k": -1}, front)
    assert ignore.params.stop_token_ids == () and ignore.params.top_k == 0


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "x", "stop": 5}, "stop", "'stop' must be a string or a list of strings"),
        ({"prompt": "x", "stop": ["a", None]}, "stop", "'stop' must be a string"),
        ({"prompt": "x", "stop": ["s"] * 17}, "stop", "at most 16 strings"),
        ({"prompt": "x", "n": 2}, "n", "only n=1 is supported"),
        ({"prompt": "x", "top_k": -2}, "top_k", "'top_k' must be an integer >= -1"),
        ({"prompt": "x", "stop_token_ids": [512]}, "stop_token_ids", "token ids in [0, 512)"),
        ({"prompt": "x", "ignore_eos": 1}, "ignore_eos", "'ignore_eos' must be true or false"),
        ({"prompt": "x", "stream_options": {"x": 1}}, "stream_options", "not supported"),
        ({"messages": []}, "messages", "'messages' must be a non-empty list"),
        ({"messages": [{"content": "hi"}]}, "messages", "with a 'role' string"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "must be a string or"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages", "lone surrogate"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools", "'tools'"),
    ],
)
def test_bad_text_fields_are_a_400_naming_the_field(hf, body, param, words):
    parse = parse_chat if "messages" in body else parse_completion
    with pytest.raises(ApiError) as err:
        parse(body, _front(hf))
    assert err.value.status == 400 and err.value.param == param, err.value.message
    assert words in err.value.message


def test_a_stop_string_ends_the_request_at_the_front_end_and_its_rank_drops_it():
    async def main():
        front = _front()
        stream = TextStream(front.tokenizer, ("lo w",))
        rec = Record("r0", [1, 2], SamplingParams(max_tokens=40), text=stream)
        assert front.admit(rec) and rec.slot == 0
        events = [("r0", i, b, None) for i, b in enumerate(b"hello world")]
        front.on_tokens(0, 1, Tokens(0, events[:3]))
        front.on_tokens(0, 1, Tokens(0, events[3:]))  # "lo w" completes at index 6
        assert rec.state is RequestState.FINISHED and rec.finish_reason == "stop"
        assert rec.emitted == list(b"hello w") and stream.text == "hel"
        assert [(s, m.id) for s, m in front.links.sent if isinstance(m, Abort)] == [(0, "r0")]
        assert front.log.late == 4 and front.log.completed == 1  # "orld": after the end
        updates = [rec.updates.get_nowait() for _ in range(rec.updates.qsize())]
        assert "".join(u.text for u in updates) == "hel" and updates[-1].finish == "stop"

    asyncio.run(main())


def test_a_requeued_request_keeps_its_text_and_stop_across_the_move():
    async def main():
        front = _front()
        rec = Record("r0", [1], SamplingParams(max_tokens=40), text=TextStream(front.tokenizer))
        assert front.admit(rec) and rec.slot == 0
        front.on_tokens(0, 1, Tokens(0, [("r0", 0, 0xC3, None)]))  # half of "é"
        front.links.incarnations.pop(0)
        front.on_view(View(2, (1,), ((1, 1),)))  # slot 0 died: re-queued on slot 1
        assert rec.slot == 1
        front.on_tokens(0, 1, Tokens(0, [("r0", 1, 0xA9, None)]))  # stale: dropped
        front.on_tokens(1, 1, Tokens(1, [("r0", 1, 0xA9, None), ("r0", 2, 0x21, "length")]))
        updates = [rec.updates.get_nowait() for _ in range(rec.updates.qsize())]
        assert [u.text for u in updates] == ["", "é", "!"] and rec.text.text == "é!"

    asyncio.run(main())
