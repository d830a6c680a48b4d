"""The runtime with ``cuda_graphs`` on (``eep launch --cuda-graphs``): on CPU ranks the decode
steps run the padded static path that a GPU would replay from graphs. Outputs still equal the
single-process run, through a rank killed mid-decode and its return."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from eep.engine.sampling import SamplingParams
from eep.tools.common import scrape_metrics

from .conftest import (
    complete,
    kill_and_recover,
    load_with_faults,
    prompts_for,
    reference_outputs,
    start_cluster,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = start_cluster(
        tiny_model_dir, tmp_path_factory.mktemp("graphs"), torchrun=False, cuda_graphs=True
    )
    yield c
    c.stop()


def test_padded_decode_steps_serve_reference_outputs_through_a_kill(cluster, tiny_model_dir):
    fault = load_with_faults(cluster, tiny_model_dir, kill_and_recover(cluster, 2))
    assert fault.requeued >= 1 and fault.tokens_during >= 1
    assert scrape_metrics(cluster.url)["eep_duplicate_tokens_total"] == 0
    # after the rejoin, new requests still equal the reference
    more = prompts_for(16)[12:]
    want = reference_outputs(tiny_model_dir, more, [SamplingParams(max_tokens=8)] * len(more))
    with ThreadPoolExecutor(len(more)) as pool:
        got = list(pool.map(lambda p: complete(cluster.url, {"prompt": p, "max_tokens": 8}), more))
    assert [r["choices"][0]["token_ids"] for r in got] == want
    log = open(os.path.join(cluster.workdir, "worker0.1.log")).read()
    assert "padded decode steps, CUDA graphs off" in log
