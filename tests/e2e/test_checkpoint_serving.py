"""A checkpoint served as users serve one: random Qwen3-MoE weights beside a real tokenizer
(a byte-level BPE trained here on Python's own sources, saved with a ChatML chat template and
a generation config, as a Hugging Face checkpoint keeps them), started with
``eep launch --model DIR`` and driven by the official ``openai`` client: completions and chat,
streamed and not, text with multi-byte characters, stop strings, the end-of-sequence ids of
``generation_config.json``, and a rank SIGKILLed while the streams run. A stream's pieces must
add up to the whole answer's text, and a kill must change no output, stop strings included."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import openai
import pytest
import torch

from eep.engine.reference import single_process_outputs
from eep.engine.sampling import SamplingParams
from eep.frontend.tokenizer import HFTokenizer, load_tokenizer
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.watcher import ViewWatcher
from eep.model.config import ModelConfig
from eep.model.random_weights import write_random_checkpoint
from eep.tools import faults
from eep.tools.common import new_cluster_name
from eep.tools.toy_tokenizer import EOS_TOKEN, write_generation_config, write_tokenizer

pytestmark = pytest.mark.slow

SLOTS = 2
EOS_PROMPT = "The end is near"
EOS_SEARCH = 24  # greedy tokens of EOS_PROMPT searched for one to declare end-of-sequence
NO_EOS = {"ignore_eos": True}  # for requests whose length matters
TEXTS = ["héllo wörld ☃", "Grüße aus 東京 😀", "def f(x):\n    return x  # ½"]


@dataclass
class Model:
    path: str
    tokenizer: HFTokenizer
    greedy: list[int]  # EOS_PROMPT's greedy tokens, ignoring end-of-sequence
    eos_at: int  # greedy[eos_at] is declared end-of-sequence in generation_config.json


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    """Random weights, the tokenizer, and a generation config whose end-of-sequence ids are
    ``<|im_end|>`` and a token the greedy completion of EOS_PROMPT reaches (random weights
    would rarely emit ``<|im_end|>`` itself)."""
    path = str(tmp_path_factory.mktemp("checkpoint"))
    config = ModelConfig.tiny()
    write_random_checkpoint(path, config, seed=0, dtype=torch.float32)
    special = write_tokenizer(path, config.vocab_size)
    tok = load_tokenizer(path, config.vocab_size)
    prompt = tok.encode(EOS_PROMPT)
    greedy = single_process_outputs(path, [prompt], [SamplingParams(max_tokens=EOS_SEARCH)])[0]
    # the last token that greedy decoding emits for the first time
    eos_at = max(i for i, t in enumerate(greedy) if t not in greedy[:i])
    assert eos_at >= 1, greedy
    write_generation_config(path, [special[EOS_TOKEN], greedy[eos_at]])
    return Model(path, load_tokenizer(path, config.vocab_size), greedy, eos_at)


class Launched:
    """``eep launch --model DIR`` in a subprocess, and what ``eep.tools.faults`` reads of a
    cluster: its URL, a view watcher, the slots' worker pids."""

    def __init__(self, model_dir: str, log_dir: str, timeout_s: float = 240):
        name = new_cluster_name("ckpt")
        eep = os.path.join(os.path.dirname(sys.executable), "eep")
        command = [eep] if os.path.exists(eep) else [sys.executable, "-m", "eep.tools.cli"]
        args = ["launch", "--model", model_dir, "--slots", str(SLOTS), "--port", "0"]
        args += ["--dtype", "float64", "--ttl", "2", "--cluster", name, "--log-dir", log_dir]
        self.proc = subprocess.Popen(
            [*command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        found = self._wait_for(r"serving at (\S+)/v1/completions \(etcd (\S+),", timeout_s)
        self.url, etcd = found.group(1), found.group(2)
        self.client, self.keys = EtcdClient(etcd), Keys(name)
        self.watcher = ViewWatcher(self.client, self.keys).start()
        self.opts = SimpleNamespace(torchrun=True)
        self.cfg = SimpleNamespace(num_slots=SLOTS)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline, seen = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            if found := re.search(pattern, line):
                return found
        self.stop()
        pytest.fail(f"eep launch did not serve within {timeout_s:.0f} s:\n{''.join(seen)}")

    def worker_pid(self, slot: int) -> int | None:
        kv = self.client.get(self.keys.slot(slot))
        return kv.json()["endpoints"].get("pid") if kv else None

    def wait_worker_pid(self, slot: int, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while (pid := self.worker_pid(slot)) is None:
            assert time.monotonic() < deadline, f"slot {slot} has no ready worker"
            time.sleep(0.05)
        return pid

    def stop(self) -> None:
        """Ctrl-C, as a user stops it (the launcher stops every process it started)."""
        if hasattr(self, "watcher"):
            self.watcher.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    launched = Launched(model.path, str(tmp_path_factory.mktemp("launch")))
    yield launched
    launched.stop()


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0, timeout=180)


def _tokens(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def _complete(client, stream: bool, **kw) -> tuple[str, list[int], str, object]:
    """``(text, token ids, finish reason, usage)`` of a completion, streamed or not."""
    if not stream:
        r = client.completions.create(model="eep", **kw)
        return r.choices[0].text, _tokens(r.choices[0]), r.choices[0].finish_reason, r.usage
    chunks = list(client.completions.create(model="eep", stream=True, **kw))
    pieces = [c.choices[0] for c in chunks]
    text = "".join(p.text for p in pieces)
    return text, [t for p in pieces for t in _tokens(p)], pieces[-1].finish_reason, None


def _chat(client, stream: bool, **kw) -> tuple[str, list[int], str, object]:
    if not stream:
        r = client.chat.completions.create(model="eep", **kw)
        c = r.choices[0]
        return c.message.content, _tokens(c), c.finish_reason, r.usage
    chunks = list(
        client.chat.completions.create(
            model="eep", stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0] for c in chunks if c.choices]
    text = "".join(p.delta.content or "" for p in pieces)
    return text, [t for p in pieces for t in _tokens(p)], pieces[-1].finish_reason, chunks[-1].usage


def test_completions_stream_exactly_the_text_of_the_whole_answer(client, model):
    tok = model.tokenizer
    for i, prompt in enumerate(TEXTS):
        kw = dict(prompt=prompt, max_tokens=40, temperature=1.0, seed=i, extra_body=NO_EOS)
        whole, ids, finish, usage = _complete(client, False, **kw)
        streamed, streamed_ids, streamed_finish, _ = _complete(client, True, **kw)
        assert streamed == whole and streamed_ids == ids and streamed_finish == finish == "length"
        assert whole == tok.decode(ids) and len(ids) == 40
        assert usage.prompt_tokens == len(tok.encode(prompt)) and usage.completion_tokens == 40


def test_chat_completions_apply_the_checkpoints_template(client, model):
    tok = model.tokenizer
    messages = [
        {"role": "system", "content": "Antworte kurz."},
        {"role": "user", "content": "Grüße 你好 ☃"},
    ]
    kw = dict(messages=messages, max_tokens=32, temperature=0.8, seed=3, extra_body=NO_EOS)
    whole, ids, finish, usage = _chat(client, False, **kw)
    streamed, streamed_ids, streamed_finish, streamed_usage = _chat(client, True, **kw)
    assert streamed == whole and streamed_ids == ids and finish == streamed_finish == "length"
    assert whole == tok.decode(ids)
    assert usage.prompt_tokens == len(tok.chat_prompt(messages)) and usage.completion_tokens == 32
    assert streamed_usage.model_dump() == usage.model_dump()


def _stop_inside(text: str, frm: float = 0.5) -> tuple[str, int]:
    """A 3-character stop string whose first occurrence in ``text`` is past ``frm`` of it."""
    for k in range(int(len(text) * frm), len(text) - 3):
        stop = text[k : k + 3]
        if text.find(stop) == k and "\ufffd" not in stop:
            return stop, k
    pytest.fail(f"no stop string to pick in {text!r}")


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_stop_string_cuts_the_text_the_same_streamed_or_not(client, kind):
    call = _complete if kind == "completion" else _chat
    kw = dict(max_tokens=60, temperature=1.0, seed=17, extra_body=NO_EOS)
    kw |= {"prompt": TEXTS[1]} if kind == "completion" else {"messages": _messages(TEXTS[1])}
    text, ids, _, _ = call(client, False, **kw)
    stop, k = _stop_inside(text)
    for stream in (False, True):
        cut, cut_ids, finish, _ = call(client, stream, stop=[stop, "never-seen"], **kw)
        assert cut == text[:k] and finish == "stop", (stop, cut, text)
        assert cut_ids == ids[: len(cut_ids)] and len(cut_ids) < len(ids)


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_the_generation_configs_eos_and_stop_token_ids_end_a_completion(client, model):
    tok, greedy, k = model.tokenizer, model.greedy, model.eos_at
    text, ids, finish, _ = _complete(client, False, prompt=EOS_PROMPT, max_tokens=EOS_SEARCH)
    assert ids == greedy[: k + 1] and finish == "stop"
    assert text == tok.decode(greedy[:k])  # the end-of-sequence token adds no text
    text, ids, finish, _ = _complete(
        client, True, prompt=EOS_PROMPT, max_tokens=EOS_SEARCH, extra_body=NO_EOS
    )
    assert ids == greedy and finish == "length" and text == tok.decode(greedy)
    j = next(i for i, t in enumerate(greedy) if i > 0 and t not in greedy[:i])
    body = {"stop_token_ids": [greedy[j]], **NO_EOS}
    _, ids, finish, _ = _complete(
        client, False, prompt=EOS_PROMPT, max_tokens=EOS_SEARCH, extra_body=body
    )
    assert ids == greedy[: j + 1] and finish == "stop"


@pytest.mark.parametrize(
    "call, kw, words",
    [
        ("completions", {"prompt": "x", "n": 2}, "only n=1"),
        ("completions", {"prompt": "x", "stop": 5}, "'stop' must be a string or a list"),
        ("chat", {"messages": []}, "'messages' must be a non-empty list"),
        ("chat", {"messages": _messages("x"), "extra_body": {"top_k": -3}}, "'top_k'"),
    ],
)
def test_bad_requests_are_a_400_that_names_the_problem(client, call, kw, words):
    create = client.completions.create if call == "completions" else client.chat.completions.create
    with pytest.raises(openai.BadRequestError) as err:
        create(model="eep", max_tokens=4, **kw)
    assert words in err.value.body["message"]


class Streams:
    """Streamed requests run in threads, every piece timestamped (what ``faults.prove`` reads
    to see tokens delivered after the fault)."""

    def __init__(self, client, requests: list[tuple[str, dict]]):
        self.times: list[float] = []
        self.errors: list[str] = []
        self.last = [0.0] * len(requests)  # when each stream's last piece came
        self.results: list[tuple[str, list[int], str] | None] = [None] * len(requests)
        self.threads = [
            threading.Thread(target=self._run, args=(client, i, kind, kw), daemon=True)
            for i, (kind, kw) in enumerate(requests)
        ]
        for t in self.threads:
            t.start()

    def _run(self, client, i: int, kind: str, kw: dict) -> None:
        text, ids, finish = [], [], None
        chat = client.chat.completions
        create = client.completions.create if kind == "completion" else chat.create
        try:
            for chunk in create(model="eep", stream=True, **kw):
                self.times.append(time.monotonic())
                self.last[i] = self.times[-1]
                c = chunk.choices[0]
                text.append(c.text if kind == "completion" else c.delta.content or "")
                ids += _tokens(c)
                finish = c.finish_reason
        except Exception as exc:  # the assertion in join() says what went wrong
            self.errors.append(f"stream {i}: {exc!r}")
        self.results[i] = ("".join(text), ids, finish)

    def tokens_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t in list(self.times))

    def join(self, timeout_s: float) -> list:
        for t in self.threads:
            t.join(timeout=timeout_s)
        assert not self.errors, self.errors
        assert all(r is not None for r in self.results), "a stream did not finish"
        return self.results


def test_a_rank_killed_mid_stream_changes_no_output_stop_strings_included(client, cluster):
    """Four seeded streams (two completions, two chats) with stop strings 3/4 of the way in;
    slot 1's worker is SIGKILLed while they stream, its requests are re-queued onto slot 0
    with the tokens they had emitted. Every stream must equal its fault-free answer."""
    requests = []
    for i in range(4):
        kw = dict(max_tokens=100, temperature=1.0, seed=40 + i, top_p=0.95)
        kw["extra_body"] = {**NO_EOS, "top_k": 200}
        if i % 2:
            requests.append(("chat", {**kw, "messages": _messages(TEXTS[i % 3])}))
        else:
            requests.append(("completion", {**kw, "prompt": TEXTS[i % 3]}))
    with ThreadPoolExecutor(4) as pool:
        calls = [(_complete if k == "completion" else _chat, kw) for k, kw in requests]
        fault_free = list(pool.map(lambda c: c[0](client, False, **c[1])[:2], calls))
    expected = []
    for (_, kw), (text, ids) in zip(requests, fault_free, strict=True):
        stop, k = _stop_inside(text, frm=0.75)
        kw["stop"] = [stop]
        expected.append((text[:k], ids))

    streams = Streams(client, requests)
    fault = faults.inject(cluster, 1, "worker", signal.SIGKILL)
    faults.wait_excluded(cluster, fault)
    faults.wait_requeued(cluster.url, fault)
    results = streams.join(timeout_s=240)
    faults.prove(fault, streams, cluster.url)
    # every stream ran past the kill: the stop strings were found in text made on both ranks
    assert min(streams.last) > fault.at, "a stream had ended before the kill"
    for (want_text, want_ids), (text, ids, finish) in zip(expected, results, strict=True):
        assert text == want_text and finish == "stop"
        assert ids == want_ids[: len(ids)]
