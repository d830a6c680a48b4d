"""Admission at the front-end, on a real cluster (etcd, coordinator, front-end, 2 CPU ranks):
every malformed request gets a prompt 4xx with an OpenAI-style body and leaves the cluster
serving; the context limit is one rank's KV (or the model's); a request that fits but not now
waits in a bounded queue, and one more is told 429 with Retry-After; a client that goes away
aborts its request, and the rank frees its KV."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from eep.config import RuntimeConfig
from eep.launcher import Cluster, ClusterOptions
from eep.model.config import ModelConfig
from eep.rank.status import StatusBlock
from eep.tools.common import new_cluster_name, scrape_metrics

from .conftest import DTYPE

pytestmark = pytest.mark.slow

SLOTS = 2
KV_BLOCKS = 32  # x 16 tokens: 512, the tiny model's max_position_embeddings too
MAX_QUEUE = 3


def start_admission_cluster(model_dir: str, tmp_path, slots: int = SLOTS, **settings) -> Cluster:
    """``start_cluster`` of tests/e2e/conftest.py with runtime ``settings`` (admission
    limits, KV size): supervisors started directly, which restart a dead worker."""
    cfg = RuntimeConfig.for_cluster(
        new_cluster_name("adm"),
        model_dir,
        slots,
        num_experts=ModelConfig.tiny().num_experts,
        dtype=DTYPE,
        ttl_s=2,
        **settings,
    )
    opts = ClusterOptions(cfg, torchrun=False, log_dir=str(tmp_path))
    return Cluster(opts).start(timeout_s=180)


def wait_until(check, what: str, timeout_s: float = 60.0, every_s: float = 0.02):
    """Poll ``check()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def slots_state(url: str) -> dict:
    return requests.get(f"{url}/debug/slots", timeout=30).json()


def membership(url: str) -> tuple[int, dict]:
    """The view's epoch and every slot's incarnation, as the front-end sees them: a rank that
    restarted changes both."""
    state = slots_state(url)
    return state["epoch"], {s: v["incarnation"] for s, v in state["slots"].items()}


def kv_free(cluster) -> list[int]:
    return [
        StatusBlock(cluster.cfg.cluster, s).get("kv_free") for s in range(cluster.cfg.num_slots)
    ]


def idle_kv(cluster) -> list[int]:
    """Every rank's free KV blocks when it holds no request."""
    return [cluster.cfg.rank_kv_tokens // cluster.cfg.block_size] * cluster.cfg.num_slots


def wait_drained(cluster, timeout_s: float = 120.0) -> None:
    """Until the front-end holds no record and every rank's KV is free again."""
    wait_until(lambda: slots_state(cluster.url)["records"] == 0, "records back to 0", timeout_s)
    want = idle_kv(cluster)
    wait_until(lambda: kv_free(cluster) == want, f"every rank's kv_free back to {want}", timeout_s)


def post_raw(url: str, body: bytes) -> socket.socket:
    """A POST to /v1/completions on a socket of its own, left open (the caller closes it)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def serves_a_normal_request(url: str) -> None:
    resp = requests.post(
        f"{url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2}, timeout=120
    )
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"][0]["token_ids"]) == 2


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = start_admission_cluster(
        tiny_model_dir,
        tmp_path_factory.mktemp("admission"),
        kv_blocks=KV_BLOCKS,
        max_queue=MAX_QUEUE,
    )
    wait_until(lambda: kv_free(c) == idle_kv(c), "ranks idle at the start")
    c.start_membership = membership(c.url)
    yield c
    c.stop()


@pytest.fixture
def no_restart(cluster):
    """The test restarts no rank and leaves the cluster serving."""
    yield
    serves_a_normal_request(cluster.url)
    assert membership(cluster.url) == cluster.start_membership


J = json.dumps
# (what, body: bytes as sent, status, words in the message, rejected reason, param)
BAD = [
    ("not JSON", b"{oops", 400, "not JSON", "invalid", None),
    ("empty body", b"", 400, "not JSON", "invalid", None),
    ("not UTF-8", b'{"prompt": "\xff\xfe"}', 400, "not JSON", "invalid", None),
    (
        "lone surrogate",
        b'{"prompt": "a\\ud800", "max_tokens": 2}',
        400,
        "not valid Unicode",
        "invalid",
        "prompt",
    ),
    ("NaN", b'{"prompt": [1], "temperature": NaN}', 400, "NaN", "invalid", None),
    ("Infinity", b'{"prompt": [1], "top_p": Infinity}', 400, "Infinity", "invalid", None),
    ("-Infinity", b'{"prompt": [1], "seed": -Infinity}', 400, "Infinity", "invalid", None),
    (
        "float overflow",
        b'{"prompt": [1], "temperature": 1e999}',
        400,
        "does not fit",
        "invalid",
        None,
    ),
    (
        "huge integer",
        b'{"prompt": [1], "max_tokens": ' + b"9" * 5000 + b"}",
        400,
        "too many digits",
        "invalid",
        None,
    ),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply", "invalid", None),
    ("a list body", J([1, 2, 3]).encode(), 400, "JSON object", "invalid", None),
    ("a string body", J("prompt").encode(), 400, "JSON object", "invalid", None),
    ("a null body", b"null", 400, "JSON object", "invalid", None),
    ("no prompt", J({"max_tokens": 4}).encode(), 400, "'prompt' must be", "invalid", "prompt"),
    (
        "empty text prompt",
        J({"prompt": ""}).encode(),
        400,
        "must not be empty",
        "invalid",
        "prompt",
    ),
    ("empty id prompt", J({"prompt": []}).encode(), 400, "must not be empty", "invalid", "prompt"),
    (
        "token id too big",
        J({"prompt": [1, 512]}).encode(),
        400,
        "token ids must be in [0, 512)",
        "invalid",
        "prompt",
    ),
    (
        "negative token id",
        J({"prompt": [-1]}).encode(),
        400,
        "token ids must be in",
        "invalid",
        "prompt",
    ),
    (
        "bool token id",
        J({"prompt": [1, True]}).encode(),
        400,
        "'prompt' must be",
        "invalid",
        "prompt",
    ),
    ("float token id", J({"prompt": [1.5]}).encode(), 400, "'prompt' must be", "invalid", "prompt"),
    (
        "object prompt",
        J({"prompt": {"text": "hi"}}).encode(),
        400,
        "'prompt' must be",
        "invalid",
        "prompt",
    ),
    (
        "nested ids",
        J({"prompt": [[1, [2]]]}).encode(),
        400,
        "'prompt' must be",
        "invalid",
        "prompt",
    ),
    (
        "two prompts",
        J({"prompt": ["a", "b"]}).encode(),
        400,
        "one prompt per request",
        "unsupported",
        "prompt",
    ),
    (
        "max_tokens 0",
        J({"prompt": [1], "max_tokens": 0}).encode(),
        400,
        "'max_tokens' must be an integer",
        "invalid",
        "max_tokens",
    ),
    (
        "max_tokens < 0",
        J({"prompt": [1], "max_tokens": -3}).encode(),
        400,
        "'max_tokens' must be an integer",
        "invalid",
        "max_tokens",
    ),
    (
        "max_tokens string",
        J({"prompt": [1], "max_tokens": "5"}).encode(),
        400,
        "'max_tokens' must be an integer",
        "invalid",
        "max_tokens",
    ),
    (
        "max_tokens bool",
        J({"prompt": [1], "max_tokens": True}).encode(),
        400,
        "'max_tokens' must be an integer",
        "invalid",
        "max_tokens",
    ),
    (
        "max_tokens float",
        J({"prompt": [1], "max_tokens": 2.5}).encode(),
        400,
        "'max_tokens' must be an integer",
        "invalid",
        "max_tokens",
    ),
    (
        "max_tokens huge",
        J({"prompt": [1, 2], "max_tokens": 10**30}).encode(),
        400,
        "maximum context length is 512 tokens",
        "context_length",
        "max_tokens",
    ),
    (
        "temperature < 0",
        J({"prompt": [1], "temperature": -1}).encode(),
        400,
        "'temperature' must be a number",
        "invalid",
        "temperature",
    ),
    (
        "temperature bool",
        J({"prompt": [1], "temperature": False}).encode(),
        400,
        "'temperature' must be a number",
        "invalid",
        "temperature",
    ),
    (
        "top_p 0",
        J({"prompt": [1], "top_p": 0}).encode(),
        400,
        "'top_p' must be a number",
        "invalid",
        "top_p",
    ),
    (
        "seed string",
        J({"prompt": [1], "seed": "7"}).encode(),
        400,
        "'seed' must be an integer",
        "invalid",
        "seed",
    ),
    (
        "seed too big",
        J({"prompt": [1], "seed": 2**63}).encode(),
        400,
        "'seed' must be an integer",
        "invalid",
        "seed",
    ),
    (
        "stream string",
        J({"prompt": [1], "stream": "yes"}).encode(),
        400,
        "'stream' must be",
        "invalid",
        "stream",
    ),
    (
        "model not a string",
        J({"prompt": [1], "model": 5}).encode(),
        400,
        "'model' must be a string",
        "invalid",
        "model",
    ),
    (
        "another model",
        J({"prompt": [1], "model": "gpt-9"}).encode(),
        404,
        "is not served here",
        "unknown_model",
        "model",
    ),
    ("n > 1", J({"prompt": [1], "n": 3}).encode(), 400, "only n=1", "unsupported", "n"),
    (
        "best_of",
        J({"prompt": [1], "best_of": 2}).encode(),
        400,
        "best_of=1",
        "unsupported",
        "best_of",
    ),
    ("echo", J({"prompt": [1], "echo": True}).encode(), 400, "'echo'", "unsupported", "echo"),
    (
        "logprobs",
        J({"prompt": [1], "logprobs": 2}).encode(),
        400,
        "'logprobs'",
        "unsupported",
        "logprobs",
    ),
    (
        "stop not strings",
        J({"prompt": [1], "stop": [1]}).encode(),
        400,
        "'stop' must be a string or a list of strings",
        "invalid",
        "stop",
    ),
    (
        "suffix",
        J({"prompt": [1], "suffix": "x"}).encode(),
        400,
        "'suffix'",
        "unsupported",
        "suffix",
    ),
    (
        "presence_penalty",
        J({"prompt": [1], "presence_penalty": 0.5}).encode(),
        400,
        "'presence_penalty'",
        "unsupported",
        "presence_penalty",
    ),
    (
        "logit_bias",
        J({"prompt": [1], "logit_bias": {"1": 5}}).encode(),
        400,
        "'logit_bias'",
        "unsupported",
        "logit_bias",
    ),
    (
        "stream_options",
        J({"prompt": [1], "stream_options": {"continuous_usage_stats": True}}).encode(),
        400,
        "'stream_options'",
        "unsupported",
        "stream_options",
    ),
]


@pytest.mark.parametrize(
    "body, status, words, reason, param",
    [pytest.param(*case[1:], id=case[0]) for case in BAD],
)
def test_a_bad_request_gets_a_prompt_4xx_naming_the_problem(
    cluster, no_restart, body, status, words, reason, param
):
    before = scrape_metrics(cluster.url)[f'eep_rejected_total{{reason="{reason}"}}']
    resp = requests.post(f"{cluster.url}/v1/completions", data=body, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert words in error["message"], error
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    after = scrape_metrics(cluster.url)[f'eep_rejected_total{{reason="{reason}"}}']
    assert after == before + 1


def test_unknown_fields_and_default_values_of_unsupported_ones_are_accepted(cluster, no_restart):
    body = {
        "prompt": ["hi"],  # a batch of one
        "max_tokens": 3,
        "user": "someone",
        "metadata": {"anything": [1, None]},  # not an OpenAI field: ignored
        "n": 1,
        "best_of": 1,
        "echo": False,
        "logprobs": None,
        "stop": [],
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "stream": None,
    }
    resp = requests.post(f"{cluster.url}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_a_body_over_16_mib_is_413_and_other_routes_answer_json(cluster, no_restart):
    resp = requests.post(f"{cluster.url}/v1/completions", data=b" " * (17 << 20), timeout=60)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large"
    resp = requests.get(f"{cluster.url}/v1/nothing", timeout=30)
    assert resp.status_code == 404 and "Not Found" in resp.json()["error"]["message"]
    resp = requests.get(f"{cluster.url}/v1/completions", timeout=30)
    assert resp.status_code == 405 and "POST" in resp.headers["Allow"]
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_the_context_limit_is_one_ranks_kv_and_an_omitted_max_tokens_fills_it(cluster, no_restart):
    models = requests.get(f"{cluster.url}/v1/models", timeout=30).json()
    assert models["data"][0]["max_model_len"] == 512 == KV_BLOCKS * 16
    resp = requests.post(
        f"{cluster.url}/v1/completions", json={"prompt": [3] * 12, "max_tokens": 501}, timeout=30
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == (
        "this model's maximum context length is 512 tokens; you asked for 513 tokens "
        "(12 in the prompt, 501 to generate)"
    )
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    resp = requests.post(f"{cluster.url}/v1/completions", json={"prompt": "x" * 512}, timeout=30)
    assert resp.status_code == 400 and "leaves none to generate" in resp.text
    # max_tokens omitted: the rest of the context, here 512 - 506 = 6 tokens
    result = requests.post(
        f"{cluster.url}/v1/completions", json={"prompt": [9] * 506}, timeout=120
    ).json()
    assert result["usage"]["completion_tokens"] == 6
    assert result["choices"][0]["finish_reason"] == "length"


class Held:
    """A streamed request whose response is held open, unread, until :meth:`close`."""

    def __init__(self, url: str, body: dict):
        self.resp = requests.post(
            f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60
        )
        assert self.resp.status_code == 200, self.resp.text

    def close(self) -> None:
        self.resp.close()


def test_a_request_that_fits_later_waits_and_a_full_queue_answers_429(cluster, no_restart):
    url = cluster.url
    before = scrape_metrics(url)
    # each request takes a whole rank's KV (512 tokens): two run, the next MAX_QUEUE wait
    held = [Held(url, {"prompt": [1]}) for _ in range(SLOTS)]
    try:
        wait_until(
            lambda: sum(s["emitting"] for s in slots_state(url)["slots"].values()) == SLOTS,
            "both ranks running a whole-KV request",
        )
        held += [Held(url, {"prompt": [2]}) for _ in range(MAX_QUEUE)]
        wait_until(lambda: slots_state(url)["queued"] == MAX_QUEUE, "the queue full")
        resp = requests.post(f"{url}/v1/completions", json={"prompt": [3]}, timeout=30)
        assert resp.status_code == 429, resp.text
        assert int(resp.headers["Retry-After"]) >= 1
        error = resp.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full", error
        assert f"{MAX_QUEUE} requests already wait" in error["message"]
        state = slots_state(url)
        assert state["queued"] == MAX_QUEUE and state["records"] == SLOTS + MAX_QUEUE
    finally:
        for h in held:
            h.close()
    # every held client went away: the queued ones leave the queue, the running ones are
    # aborted on their ranks, which free the KV
    wait_drained(cluster)
    after = scrape_metrics(url)
    key = 'eep_aborted_total{reason="client_disconnect"}'
    assert after[key] - before[key] == SLOTS + MAX_QUEUE
    key = 'eep_rejected_total{reason="queue_full"}'
    assert after[key] - before[key] == 1
    assert after["eep_requests_completed_total"] == before["eep_requests_completed_total"]
    assert_stopped_early(before, after, SLOTS)


def assert_stopped_early(before: dict, after: dict, aborted: int) -> None:
    """The ranks stopped the ``aborted`` requests (511 tokens each) soon after the abort:
    what they generated after it arrives as late tokens, dropped and counted."""
    served = after["eep_tokens_total"] - before["eep_tokens_total"]
    late = after["eep_late_tokens_total"] - before["eep_late_tokens_total"]
    assert served + late < aborted * 511 // 2, (served, late)


def test_a_client_that_goes_away_aborts_its_request_and_frees_its_kv(cluster, no_restart):
    url = cluster.url
    before = scrape_metrics(url)
    # streamed: the client closes after 3 chunks
    with requests.post(
        f"{url}/v1/completions", json={"prompt": [4], "stream": True}, stream=True, timeout=60
    ) as resp:
        lines = (line for line in resp.iter_lines() if line)
        assert all(next(lines).startswith(b"data: {") for _ in range(3))
    wait_drained(cluster)
    # not streamed: the client hangs up while its request runs
    sock = post_raw(url, json.dumps({"prompt": [5]}).encode())
    wait_until(lambda: slots_state(url)["records"] == 1, "the request admitted")
    wait_until(
        lambda: any(s["emitting"] for s in slots_state(url)["slots"].values()),
        "the request running",
    )
    sock.close()
    wait_drained(cluster)
    after = scrape_metrics(url)
    key = 'eep_aborted_total{reason="client_disconnect"}'
    assert after[key] - before[key] == 2
    assert_stopped_early(before, after, 2)
    assert after["eep_requests_completed_total"] == before["eep_requests_completed_total"]


def test_a_denormal_temperature_is_greedy_and_kills_no_rank(cluster, no_restart):
    # found by the fuzz: logits / 5e-324 overflow, and the rank's sampler died on the NaNs
    url, body = cluster.url, {"prompt": [8, 9], "max_tokens": 3}
    greedy = requests.post(f"{url}/v1/completions", json=body, timeout=120).json()
    tiny = requests.post(
        f"{url}/v1/completions", json={**body, "temperature": 5e-324, "seed": 1}, timeout=120
    )
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]
