"""Issue 5's acceptance: 4 CPU ranks under torchrun serve through the HTTP endpoint and every
completion equals the single-process result token for token."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from eep.engine.sampling import SamplingParams
from eep.tools.common import scrape_metrics

from .conftest import complete, prompts_for, reference_outputs, start_cluster, stream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = start_cluster(tiny_model_dir, tmp_path_factory.mktemp("serving"), torchrun=True)
    yield c
    c.stop()


def test_concurrent_requests_equal_the_single_process_result(cluster, tiny_model_dir):
    prompts = prompts_for(16)
    params = [SamplingParams(max_tokens=12 + i % 5) for i in range(16)]
    expected = reference_outputs(tiny_model_dir, prompts, params)
    with ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(complete, cluster.url, {"prompt": p, "max_tokens": sp.max_tokens})
            for p, sp in zip(prompts, params, strict=True)
        ]
        results = [f.result() for f in futures]
    for i, result in enumerate(results):
        choice = result["choices"][0]
        assert choice["token_ids"] == expected[i], f"request {i}"
        assert choice["finish_reason"] == "length"
        assert result["usage"]["completion_tokens"] == params[i].max_tokens


def test_seeded_sampling_equals_the_single_process_result(cluster, tiny_model_dir):
    prompts = prompts_for(4)
    params = [SamplingParams(max_tokens=10, temperature=0.8, seed=100 + i) for i in range(4)]
    expected = reference_outputs(tiny_model_dir, prompts, params)
    for i, p in enumerate(prompts):
        body = {"prompt": p, "max_tokens": 10, "temperature": 0.8, "seed": 100 + i}
        assert complete(cluster.url, body)["choices"][0]["token_ids"] == expected[i]


def test_a_streamed_completion_arrives_token_by_token(cluster, tiny_model_dir):
    prompt = prompts_for(1)[0]
    expected = reference_outputs(tiny_model_dir, [prompt], [SamplingParams(max_tokens=9)])[0]
    chunks = stream(cluster.url, {"prompt": prompt, "max_tokens": 9})
    assert [c["choices"][0]["token_ids"][0] for c in chunks] == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 8 + ["length"]


def test_a_text_prompt_is_tokenized_bytewise(cluster, tiny_model_dir):
    expected = reference_outputs(tiny_model_dir, [list(b"hello")], [SamplingParams(max_tokens=5)])
    result = complete(cluster.url, {"prompt": "hello", "max_tokens": 5})
    assert result["choices"][0]["token_ids"] == expected[0]
    assert result["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"max_tokens": 4}, 400, "'prompt' must be"),
        ({"prompt": [], "max_tokens": 4}, 400, "must not be empty"),
        ({"prompt": [1, 99999]}, 400, "token ids must be in"),
        ({"prompt": [1], "max_tokens": 0}, 400, "'max_tokens' must be an integer"),
        ({"prompt": [1], "max_tokens": "5"}, 400, "'max_tokens' must be an integer"),
        ({"prompt": [1], "temperature": -1}, 400, "'temperature' must be a number"),
        ({"prompt": [1], "n": 3}, 400, "only n=1"),
        ({"prompt": [1], "stream": "yes"}, 400, "'stream' must be"),
        ({"prompt": [1], "model": "gpt-9"}, 404, "is not served here"),
        ([1, 2, 3], 400, "JSON object"),
    ],
)
def test_a_malformed_request_gets_a_4xx_with_a_message(cluster, body, status, words):
    resp = requests.post(f"{cluster.url}/v1/completions", json=body, timeout=30)
    assert resp.status_code == status
    assert words in resp.json()["error"]["message"]


def test_a_chat_with_a_model_that_has_no_chat_template_is_a_400_saying_so(cluster):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    resp = requests.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "no_chat_template" and "no chat template" in error["message"]


def test_a_body_that_is_not_json_is_refused(cluster):
    resp = requests.post(f"{cluster.url}/v1/completions", data=b"{oops", timeout=30)
    assert resp.status_code == 400 and "not JSON" in resp.json()["error"]["message"]


def test_models_health_and_metrics_answer(cluster):
    models = requests.get(f"{cluster.url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["eep"]
    health = requests.get(f"{cluster.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["live_slots"] == [0, 1, 2, 3]
    metrics = scrape_metrics(cluster.url)  # parsed by prometheus_client's own parser
    assert metrics["eep_view_epoch"] >= 1 and metrics["eep_live_slots"] == 4
    served = [metrics[f'eep_slot_tokens_total{{slot="{s}"}}'] for s in range(4)]
    assert sum(served) == metrics["eep_tokens_total"]
