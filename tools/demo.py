"""``eep demo``: the README's main job.

An embedded etcd, a coordinator, the front-end and four CPU ranks (each under its own
torchrun agent) serve a tiny random Qwen3-MoE. A load of streamed requests runs; one rank's
worker is SIGKILLed mid-decode; its supervisor revokes the lease, the survivors move to the
next view, the dead rank's requests are re-queued, the supervisor restarts the worker and the
view takes it back. The timeline and the invariants are printed: requests lost, outputs equal
to a fault-free single-process run, tokens duplicated or skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from .common import scrape_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slots", type=int, default=4, help="ranks to start (default 4)")
    parser.add_argument("--kill", type=int, default=2, help="the slot to kill (default 2)")
    parser.add_argument("--requests", type=int, default=12, help="concurrent requests (12)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument("--no-torchrun", action="store_true", help="start supervisors directly")
    parser.add_argument("--log-dir", default=None, help="keep the processes' logs here")


class _Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def mark(self, text: str) -> float:
        now = time.monotonic() - self.t0
        with self.lock:
            print(f"[{now:7.3f} s] {text}", flush=True)
        return now


def _stream(url: str, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    import requests

    tokens, times = [], []
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                tokens.append(json.loads(line[6:])["choices"][0]["token_ids"][0])
                times.append(time.monotonic())
    return tokens, times


def run(args: argparse.Namespace) -> int:

    from eep.config import RuntimeConfig
    from eep.engine.reference import single_process_outputs
    from eep.engine.sampling import SamplingParams
    from eep.launcher import Cluster, ClusterOptions, LaunchError
    from eep.model.config import ModelConfig

    from .launch import tiny_model

    if not 0 <= args.kill < args.slots:
        raise SystemExit(f"--kill {args.kill} must name one of the {args.slots} slots")
    tl = _Timeline()
    model_path = os.path.abspath(tiny_model())
    num_experts = ModelConfig.from_dir(model_path).num_experts
    cfg = RuntimeConfig(
        cluster=f"demo-{uuid.uuid4().hex[:6]}",
        model_path=model_path,
        num_slots=args.slots,
        experts_per_slot=-(-2 * num_experts // args.slots),
        dtype="float64",
        ttl_s=3,
    )
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(3 + i % 6)] for i in range(args.requests)]
    tl.mark(f"computing the fault-free reference of {args.requests} requests (one process)")
    expected = single_process_outputs(
        model_path, prompts, [SamplingParams(max_tokens=args.max_tokens)] * len(prompts)
    )
    tl.mark(
        f"starting etcd, coordinator, front-end and {args.slots} ranks "
        f"({'directly' if args.no_torchrun else 'one torchrun agent each'})"
    )
    try:
        cluster = Cluster(
            ClusterOptions(cfg, torchrun=not args.no_torchrun, log_dir=args.log_dir)
        ).start(timeout_s=240)
    except LaunchError as exc:
        print(f"eep demo: {exc}")
        return 1
    try:
        return _drive(cluster, args, tl, prompts, expected)
    finally:
        cluster.stop()


def _drive(cluster, args, tl: _Timeline, prompts, expected) -> int:
    epoch0 = cluster.watcher.latest.epoch
    tl.mark(
        f"serving at {cluster.url}: view {epoch0} members {list(cluster.watcher.latest.members)}"
    )
    views = []
    cluster.watcher.on_view = lambda v: views.append(
        (tl.mark(f"view {v.epoch} committed: members {list(v.members)} ({v.reason})"), v)
    )
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(_stream, cluster.url, p, args.max_tokens) for p in prompts]
        tl.mark(f"load: {len(prompts)} streamed requests of {args.max_tokens} tokens")
        time.sleep(1.0)
        pid = cluster.wait_worker_pid(args.kill)
        os.kill(pid, signal.SIGKILL)
        kill_at = tl.mark(f"slot {args.kill}: worker pid {pid} SIGKILLed mid-decode")
        results = [f.result() for f in futures]
    tl.mark("every request finished")
    back = cluster.watcher.wait_for(
        lambda v: v.epoch > epoch0 and len(v.members) == args.slots, timeout_s=120
    )
    tl.mark(f"slot {args.kill} is back: incarnation {back.incarnation(args.kill) if back else '?'}")
    equal = sum(tokens == expected[i] for i, (tokens, _) in enumerate(results))
    lost = sum(len(tokens) != args.max_tokens for tokens, _ in results)
    gaps = [b - a for _, times in results for a, b in zip(times, times[1:], strict=False)]
    removed = [t for t, v in views if args.kill not in v.members]
    print("\ntimeline (seconds after the kill)")
    if removed:
        print(f"  view without slot {args.kill} committed: {removed[0] - kill_at:7.3f}")
    readded = [t for t, v in views if args.kill in v.members and t > kill_at]
    if readded:
        print(f"  restarted slot {args.kill} back in the view: {readded[0] - kill_at:7.3f}")
    print(f"  longest gap between two tokens of one stream: {max(gaps):.3f} s")
    print("\ninvariants")
    print(f"  requests lost:                          {lost}")
    print(f"  outputs equal to the fault-free run:    {equal}/{len(results)}")
    metrics = scrape_metrics(cluster.url)
    dup = metrics.get("eep_duplicate_tokens_total", float("nan"))
    print(f"  tokens duplicated or out of order:      {dup:.0f}")
    requeued = metrics.get("eep_requeued_total", float("nan"))
    print(f"  requests re-queued off the dead slot:   {requeued:.0f}")
    ok = lost == 0 and equal == len(results) and dup == 0 and back is not None
    print(f"\n{'OK' if ok else 'FAILED'}: logs in {cluster.workdir}")
    return 0 if ok else 1
