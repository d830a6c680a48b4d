"""Quarantine, on a real cluster (etcd, coordinator, front-end, 4 CPU ranks): a request whose
rank dies is re-queued once, and when its second rank dies too (``quarantine_after`` 2) it is
failed with a clear error instead of going round the cluster killing ranks."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from eep.tools import faults
from eep.tools.common import scrape_metrics

from .test_admission import (
    serves_a_normal_request,
    slots_state,
    start_admission_cluster,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = start_admission_cluster(
        tiny_model_dir, tmp_path_factory.mktemp("quarantine"), slots=4, quarantine_after=2
    )
    yield c
    c.stop()


def _streamed(url: str) -> list[dict]:
    events = []
    with requests.post(
        f"{url}/v1/completions", json={"prompt": [1], "stream": True}, stream=True, timeout=300
    ) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
    return events


def _not_streamed(url: str) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"prompt": [2]}, timeout=300)


def _two_running(url: str) -> list[int] | None:
    """The two slots the two requests run on, once each runs and has streamed."""
    slots = slots_state(url)["slots"]
    busy = sorted(int(s) for s, v in slots.items() if v["in_flight"] and v["emitting"])
    return busy if len(busy) == 2 else None


def _kill_workers(cluster, slots: list[int]) -> list[faults.Fault]:
    hit = [faults.inject(cluster, s, "worker", signal.SIGKILL) for s in slots]
    for fault in hit:
        faults.wait_excluded(cluster, fault)
    return hit


def test_a_request_on_two_ranks_that_died_is_failed_not_retried(cluster):
    url = cluster.url
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(_streamed, url)
        plain = pool.submit(_not_streamed, url)
        # both run (511 tokens each, seconds on CPU ranks), one per slot
        first = wait_until(lambda: _two_running(url), "both running")
        for fault in _kill_workers(cluster, first):
            faults.wait_requeued(url, fault)
        # re-queued once, onto two other slots: kill those too
        second = wait_until(lambda: _two_running(url), "both running again")
        assert not set(first) & set(second), (first, second)
        _kill_workers(cluster, second)
        events, resp = streamed.result(timeout=300), plain.result(timeout=300)
    assert resp.status_code == 500, resp.text
    error = resp.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "quarantined", error
    assert "failed on 2 ranks" in error["message"] and "not retried" in error["message"]
    assert "error" in events[-1], events[-1]
    assert events[-1]["error"]["code"] == "quarantined"
    assert "failed on 2 ranks" in events[-1]["error"]["message"]
    assert all("choices" in e for e in events[:-1])  # the tokens before, then the error
    metrics = scrape_metrics(url)
    assert metrics['eep_aborted_total{reason="quarantined"}'] == 2
    assert metrics["eep_requests_failed_total"] == 2 and metrics["eep_records"] == 0
    # the four killed ranks come back, and the cluster serves
    back = cluster.watcher.wait_for(
        lambda v: (
            len(v.members) == 4
            and all(inc >= 2 for s, inc in v.incarnations if s in first + second)
        ),
        180,
    )
    assert back is not None, "the killed ranks did not come back"
    wait_until(
        lambda: len(requests.get(f"{url}/health", timeout=30).json()["live_slots"]) == 4,
        "all four slots live",
        180,
    )
    serves_a_normal_request(url)
