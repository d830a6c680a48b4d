"""``eep demo``: the README's main job.

An embedded etcd, a coordinator, the front-end and four CPU ranks (each under its own
torchrun agent) serve a tiny random Qwen3-MoE. Streamed requests are held continuously (the
project's one load generator, closed loop). Once requests stream on the chosen slot, its
worker is SIGKILLed; its supervisor revokes the lease, the survivors move to the next view,
the dead rank's requests are re-queued, the supervisor restarts the worker, the view takes it
back and in-flight requests move onto it with their KV. The load runs on past the rejoin.

The OK line needs every one of: requests in flight on the killed slot at the kill, at least
one re-queued and one migrated, no request lost, every output equal to a fault-free
single-process run, no token duplicated; it prints the worst single stream's stall.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from .common import add_cluster_arguments, new_cluster_name, runtime_config, scrape_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cluster_arguments(parser, "slots")
    parser.add_argument("--kill", type=int, default=2, help="the slot to kill (default 2)")
    parser.add_argument(
        "--streams", type=int, default=12, help="requests held continuously (default 12)"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (64)")
    parser.add_argument(
        "--tail-tokens",
        type=int,
        default=400,
        help="tokens streamed after the rejoin before the load drains (default 400)",
    )
    parser.add_argument("--no-torchrun", action="store_true", help="start supervisors directly")
    parser.add_argument("--log-dir", default=None, help="keep the processes' logs here")


class _Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def mark(self, text: str, at: float | None = None) -> float:
        now = (at if at is not None else time.monotonic()) - self.t0
        with self.lock:
            print(f"[{now:7.3f} s] {text}", flush=True)
        return now


PROMPTS = 16


def run(args: argparse.Namespace) -> int:
    from eep.engine.reference import single_process_outputs
    from eep.engine.sampling import SamplingParams
    from eep.launcher import Cluster, ClusterOptions, LaunchError

    from .launch import tiny_model
    from .loadgen import prompts_for

    if not 0 <= args.kill < args.slots or args.slots < 2:
        raise SystemExit(f"--kill {args.kill} must name one of the --slots {args.slots} (>= 2)")
    if args.streams < args.slots or args.max_tokens < 8 or args.tail_tokens < 1:
        raise SystemExit("--streams must be >= --slots, --max-tokens >= 8, --tail-tokens >= 1")
    tl = _Timeline()
    model_path = os.path.abspath(tiny_model())
    # CPU ranks in float64 (exact: the outputs are checked against a single-process run)
    cfg = runtime_config(args, model_path, new_cluster_name("demo"), exact=True)
    prompts = prompts_for(PROMPTS)
    tl.mark(f"computing the fault-free reference of {PROMPTS} prompts (one process)")
    params = [SamplingParams(max_tokens=args.max_tokens)] * len(prompts)
    expected = single_process_outputs(model_path, prompts, params, cfg.torch_dtype)
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
    from . import faults
    from .loadgen import Load, LoadSpec

    epoch0 = cluster.watcher.latest.epoch
    tl.mark(
        f"serving at {cluster.url}: view {epoch0} members {list(cluster.watcher.latest.members)}"
    )
    faults.wait_standbys(cluster)  # each slot's warm standby, the replacement of its worker
    tl.mark("every slot has a warm standby worker")
    cluster.watcher.on_view = lambda v: tl.mark(
        f"view {v.epoch} committed: members {list(v.members)} ({v.reason})"
    )
    spec = LoadSpec(max_tokens=args.max_tokens, streams=args.streams)
    load = Load(cluster.url, prompts, spec).start()
    tl.mark(f"load: {spec.describe()}")
    try:
        # a steady state first: every stream has streamed a few tokens
        if not load.wait_tokens(4 * args.streams, timeout_s=300):
            raise faults.FaultMissed("the load streamed nothing for 300 s; read the logs")
        fault = faults.inject(cluster, args.kill, min_emitting=2)
        tl.mark(
            f"slot {args.kill}: worker pid {fault.pid} SIGKILLed with {fault.in_flight} requests "
            f"in flight on it ({fault.emitting} streaming)",
            fault.at,
        )
        faults.wait_excluded(cluster, fault)
        n = faults.wait_requeued(cluster.url, fault)
        tl.mark(f"front-end re-queued {n} requests off slot {args.kill} onto the survivors")
        back = faults.wait_rejoined(cluster, fault)
        tl.mark(f"slot {args.kill} is back: incarnation {back.incarnation(args.kill)}")
        n = faults.wait_migrated(cluster.url, fault)
        tl.mark(f"{n} in-flight requests moved onto slot {args.kill} with their KV")
        streamed = sum(len(s.times) for s in load.snapshot())
        load.wait_tokens(streamed + args.tail_tokens, timeout_s=300)
        tl.mark(f"{args.tail_tokens} more tokens streamed after the rejoin; draining the load")
    except faults.FaultMissed as exc:
        load.stop(timeout_s=300)
        print(f"\nFAILED: the fault did not land on live load: {exc}")
        return 1
    stuck = load.stop(timeout_s=300)
    tl.mark("every request finished" if not stuck else f"{stuck} requests never finished")
    return _report(cluster, args, fault, load, expected, stuck)


def _report(cluster, args, fault, load, expected, stuck: int) -> int:
    from . import faults

    streams = load.snapshot()
    done = [s for s in streams if s.error is None and len(s.tokens) == args.max_tokens]
    equal = sum(s.tokens == expected[s.prompt_idx] for s in done)
    lost = len(streams) - len(done)
    crossing = [s for s in streams if s.started < fault.at and (s.ended or 0) > fault.at]
    stalls = [(g[1] - g[0], s) for s in crossing if (g := s.longest_gap())]
    worst, worst_stream = max(stalls, key=lambda x: x[0]) if stalls else (0.0, None)
    try:
        faults.prove(fault, load, cluster.url, migration=True)
        landed = True
    except faults.FaultMissed as exc:
        print(f"\nthe fault did not land: {exc}")
        landed = False
    metrics = scrape_metrics(cluster.url)
    dup = metrics.get("eep_duplicate_tokens_total", float("nan"))
    print("\ntimeline (seconds after the kill)")
    print(f"  view without slot {args.kill} committed:   {fault.excluded_at - fault.at:7.3f}")
    print(f"  restarted slot {args.kill} back in the view: {fault.rejoined_at - fault.at:7.3f}")
    print("\nthe fault landed on live load")
    print(f"  requests in flight on slot {args.kill} at the kill: {fault.in_flight}")
    print(f"  requests re-queued off it:                {fault.requeued}")
    print(f"  requests migrated onto it after its rejoin: {fault.migrated}")
    print(f"  tokens delivered from the kill to the rejoin: {fault.tokens_during}")
    print("\ninvariants")
    print(f"  requests:                               {len(streams)}")
    print(f"  requests lost:                          {lost}")
    print(f"  outputs equal to the fault-free run:    {equal}/{len(streams)}")
    print(f"  tokens duplicated or out of order:      {dup:.0f}")
    where = f" (request {worst_stream.request_id})" if worst_stream else ""
    print(f"  worst single stream's stall:            {worst:.3f} s{where}")
    ok = (
        landed
        and stuck == 0
        and lost == 0
        and equal == len(streams)
        and dup == 0
        and fault.in_flight >= 1
    )
    figures = (
        f"{fault.in_flight} in flight on slot {args.kill} at the kill, {fault.requeued} "
        f"re-queued, {fault.migrated} migrated, worst stream stall {worst:.2f} s, "
        f"{equal}/{len(streams)} outputs equal to the fault-free run, {lost} lost, "
        f"{dup:.0f} duplicated"
    )
    print(f"\n{'OK' if ok else 'FAILED'}: {figures}; logs in {cluster.workdir}")
    return 0 if ok else 1
