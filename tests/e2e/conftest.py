"""A real cluster on this machine: embedded etcd, coordinator, front-end, 4 CPU ranks."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from eep.config import RuntimeConfig
from eep.engine.reference import single_process_outputs
from eep.engine.sampling import SamplingParams
from eep.launcher import Cluster, ClusterOptions
from eep.model.config import ModelConfig
from eep.model.random_weights import write_random_checkpoint

# float64 on the CPU: a rank batches other requests than the single-process reference does,
# and in float64 those different summation orders cannot flip a greedy token.
DTYPE = "float64"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-model"))
    write_random_checkpoint(path, ModelConfig.tiny(), seed=0, dtype=torch.float32)
    return path


def start_cluster(
    model_dir: str,
    tmp_path,
    torchrun: bool,
    slots: int = 4,
    baseline: bool = False,
    cuda_graphs: bool = False,
) -> Cluster:
    cfg = RuntimeConfig(
        cluster=f"e2e-{uuid.uuid4().hex[:6]}",
        model_path=model_dir,
        num_slots=slots,
        experts_per_slot=-(-2 * ModelConfig.tiny().num_experts // slots),
        dtype=DTYPE,
        ttl_s=2,
        exchange_timeout_s=2.0,
        cuda_graphs=cuda_graphs,
    )
    opts = ClusterOptions(cfg, torchrun=torchrun, log_dir=str(tmp_path), baseline=baseline)
    return Cluster(opts).start(timeout_s=180)


def reference_outputs(model_dir: str, prompts: list[list[int]], params: list[SamplingParams]):
    """The single-process result: one engine, every expert local."""
    return single_process_outputs(model_dir, prompts, params, getattr(torch, DTYPE))


def complete(url: str, body: dict, timeout_s: float = 120) -> dict:
    resp = requests.post(f"{url}/v1/completions", json=body, timeout=timeout_s)
    assert resp.status_code == 200, resp.text
    return resp.json()


def stream(url: str, body: dict, timeout_s: float = 120) -> list[dict]:
    chunks = []
    with requests.post(
        f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=timeout_s
    ) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if not line:
                continue
            assert line.startswith(b"data: ")
            if line == b"data: [DONE]":
                break
            chunks.append(json.loads(line[6:]))
    return chunks


def load_with_faults(cluster, model_dir, faults, n=12, max_tokens=28, timeout_s=180):
    """``n`` concurrent requests; ``faults(futures, epoch_before)`` runs mid-decode. Every
    output must equal the single-process run. Returns ``(epoch_before, what faults returned)``."""
    prompts = prompts_for(n)
    params = [SamplingParams(max_tokens=max_tokens) for _ in range(n)]
    expected = reference_outputs(model_dir, prompts, params)
    epoch_before = cluster.watcher.latest.epoch
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(complete, cluster.url, {"prompt": p, "max_tokens": max_tokens}, timeout_s)
            for p in prompts
        ]
        time.sleep(0.5)  # mid-decode
        during = faults(futures, epoch_before)
        results = [f.result() for f in futures]
    for i, result in enumerate(results):
        assert result["choices"][0]["token_ids"] == expected[i], f"request {i}"
    return epoch_before, during


def kill_slots(cluster, slots, sig=signal.SIGKILL):
    """A ``faults`` for :func:`load_with_faults`: ``sig`` to the workers of ``slots``."""

    def kill(futures, epoch_before):
        for slot in slots:
            os.kill(cluster.wait_worker_pid(slot), sig)

    return kill


def prompts_for(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 500 + 1 for j in range(3 + i % 6)] for i in range(n)]


@pytest.fixture
def dump_logs_on_failure(request):
    """Attach the cluster's logs to a failed test's report."""
    yield
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        cluster = request.getfixturevalue("cluster")
        for name in sorted(os.listdir(cluster.workdir)):
            if name.endswith(".log"):
                with open(os.path.join(cluster.workdir, name), errors="replace") as f:
                    print(f"==== {name}\n{f.read()[-3000:]}")
