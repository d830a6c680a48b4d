"""A real cluster on this machine: embedded etcd, coordinator, front-end, 4 CPU ranks."""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests
import torch

from eep.config import RuntimeConfig, default_dtype
from eep.engine.reference import single_process_outputs
from eep.engine.sampling import SamplingParams
from eep.launcher import Cluster, ClusterOptions
from eep.model.config import ModelConfig
from eep.model.random_weights import write_random_checkpoint
from eep.tools import faults
from eep.tools.common import new_cluster_name
from eep.tools.loadgen import Load, LoadSpec, prompts_for

__all__ = ["prompts_for"]  # re-exported for the e2e tests

# float64 on the CPU: a rank batches other requests than the single-process reference does,
# and in float64 those different summation orders cannot flip a greedy token.
DTYPE = default_dtype("cpu", exact=True)


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
    cluster_type: type[Cluster] = Cluster,
    standby: bool = True,
) -> Cluster:
    cfg = RuntimeConfig.for_cluster(
        new_cluster_name("e2e"),
        model_dir,
        slots,
        num_experts=ModelConfig.tiny().num_experts,
        dtype=DTYPE,
        baseline=baseline,
        ttl_s=2,
        cuda_graphs=cuda_graphs,
    )
    opts = ClusterOptions(
        cfg, torchrun=torchrun, log_dir=str(tmp_path), baseline=baseline, standby=standby
    )
    return cluster_type(opts).start(timeout_s=180)


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


_REFERENCES: dict[tuple, list[list[int]]] = {}


def reference_for(model_dir: str, n: int, max_tokens: int) -> list[list[int]]:
    """The single-process outputs of ``prompts_for(n)``, computed once per session."""
    key = (model_dir, n, max_tokens)
    if key not in _REFERENCES:
        params = [SamplingParams(max_tokens=max_tokens)] * n
        _REFERENCES[key] = reference_outputs(model_dir, prompts_for(n), params)
    return _REFERENCES[key]


def load_with_faults(
    cluster, model_dir, faults, streams=12, max_tokens=28, tail_tokens=48, timeout_s=300
):
    """``streams`` requests held continuously (the one load generator, closed loop) while
    ``faults(load)`` injects its faults into live load and waits for the states it expects.
    After it returns, the load runs on until ``tail_tokens`` more tokens have streamed, then
    drains. Every request must complete with the single-process result; nothing is lost.
    Returns what ``faults`` returned."""
    prompts = prompts_for(PROMPTS)
    expected = reference_for(model_dir, PROMPTS, max_tokens)
    load = Load(cluster.url, prompts, LoadSpec(max_tokens=max_tokens, streams=streams)).start()
    try:
        assert load.wait_tokens(1, timeout_s), "the load never streamed a token"
        during = faults(load)
        streamed = sum(len(s.times) for s in load.snapshot())
        assert load.wait_tokens(streamed + tail_tokens, timeout_s), "no load after the faults"
    finally:
        stuck = load.stop(timeout_s=timeout_s)
    assert stuck == 0, f"{stuck} requests never finished"
    streams_ = load.snapshot()
    errors = [s.error for s in streams_ if s.error]
    assert not errors, f"{len(errors)} requests failed: {errors[:3]}"
    for st in streams_:
        want = expected[st.prompt_idx]
        assert st.tokens == want, f"request {st.seq} ({st.request_id}) differs from the reference"
    return during


PROMPTS = 16  # distinct prompts, cycled by the load


def kill_and_recover(cluster, slot, sig=signal.SIGKILL, target="worker", migration=False):
    """A ``faults`` for :func:`load_with_faults`: ``sig`` to ``slot``'s ``target`` once it
    streams, then wait for the view without it, its re-queue, and its rejoin; the fault must
    have landed (:func:`eep.tools.faults.prove`). Returns the :class:`Fault`."""

    def run(load):
        fault = faults.inject(cluster, slot, target, sig)
        faults.wait_excluded(cluster, fault)
        faults.wait_requeued(cluster.url, fault)
        faults.wait_rejoined(cluster, fault)
        if migration:
            faults.wait_migrated(cluster.url, fault)
        return faults.prove(fault, load, cluster.url, migration=migration)

    return run


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
