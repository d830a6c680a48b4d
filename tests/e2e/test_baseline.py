"""The full-restart baseline (``eep launch --baseline``): one torchrun over every slot, so a
worker SIGKILLed mid-decode makes torchrun restart every slot (each with a new incarnation),
and every request still completes with the single-process result once the new view is in."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from eep.engine.sampling import SamplingParams

from .conftest import complete, prompts_for, reference_outputs, start_cluster

pytestmark = pytest.mark.slow

SLOTS = 4


@pytest.fixture
def cluster(tiny_model_dir, tmp_path):
    c = start_cluster(tiny_model_dir, tmp_path, torchrun=True, slots=SLOTS, baseline=True)
    yield c
    c.stop()


def test_a_killed_worker_restarts_every_slot_and_loses_no_request(cluster, tiny_model_dir):
    before = cluster.watcher.latest
    assert len(before.members) == SLOTS
    n, max_tokens = 8, 24
    prompts = prompts_for(n)
    expected = reference_outputs(tiny_model_dir, prompts, [SamplingParams(max_tokens)] * n)
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(complete, cluster.url, {"prompt": p, "max_tokens": max_tokens}, 180)
            for p in prompts
        ]
        time.sleep(0.5)  # mid-decode
        os.kill(cluster.wait_worker_pid(2), signal.SIGKILL)
        results = [f.result() for f in futures]
    for i, result in enumerate(results):
        assert result["choices"][0]["token_ids"] == expected[i], f"request {i}"
    back = cluster.watcher.wait_for(
        lambda v: (
            len(v.members) == SLOTS
            and all(v.incarnation(s) > before.incarnation(s) for s in range(SLOTS))
        ),
        timeout_s=120,
    )
    assert back is not None, "not every slot came back with a new incarnation"
    assert cluster.procs["slots"].poll() is None, "the torchrun agent gave up"
