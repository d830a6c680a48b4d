"""``eep bench multihost``: ranks on several hosts (network namespaces) against one host.

Both clusters run in the same run, on the same three "hosts" (:mod:`eep.tools.netns`: a
namespace each, on a bridge, etcd with one member per host), started as an operator starts
them (one ``eep launch`` per host, :class:`~eep.tools.multihost.MultiHostCluster`):

- ``single-host``: every slot on host 0, the ``shm`` fabric (what a user runs on one host);
- ``cross-host``: slots 0 and 2 on host 0, 1 and 3 on host 1, the ``te`` fabric (tokens cross
  hosts through the Mooncake Transfer Engine over TCP).

Each serves a closed-loop load of ``--streams`` requests for ``--seconds`` after a warm-up;
the ratio cross/single of tokens/s is the price of the hosts. Then, on the cross-host
cluster, each fault of ``--cases`` runs under live load (:func:`host_fault`: its timeline and
invariants):

- ``partition``: host 1's link down (everything, etcd included), then up;
- ``kill``: every process of host 1 SIGKILLed (ranks, standbys, its etcd member), then
  started again as an operator would (its etcd member, ``eep launch --join``);
- ``etcd-cut``: host 1 cut from etcd alone (its data plane up);
- ``dataplane-cut``: host 1 cut from everything but etcd and the front-end (suspicion);
- ``loss-<pct>``: ``pct`` % of host 1's packets dropped both ways for ``--seconds``: no view
  may change; the tokens/s against the clean rate is the cost.

On a 2-core machine the ranks of both clusters share the cores with the load generator: the
ratio measures the cross-host path's overhead under that contention, not a network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from .loadgen import Load, LoadSpec, measure_capacity, prompts_for

DEFAULT_CASES = "partition,kill,etcd-cut,dataplane-cut,loss-1"
CROSS = {0: (0, 2), 1: (1, 3)}  # slots 0/1 and 2/3 hold the same experts: one of each here
SINGLE = {0: (0, 1, 2, 3)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"faults to run, comma-separated ({DEFAULT_CASES})"
    )
    parser.add_argument("--streams", type=int, default=12, help="requests held at once (12)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured load (20 s)")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="load before (5 s)")
    parser.add_argument(
        "--out",
        default=None,
        help="write the JSON here (default: docs/results/<date>-cpu-multihost.json)",
    )
    parser.add_argument("--log-dir", default=None, help="keep the clusters' logs here")


def _model(root: str) -> str:
    import torch

    from eep.model.config import ModelConfig
    from eep.model.random_weights import write_random_checkpoint

    path = os.path.join(root, "model")
    write_random_checkpoint(path, ModelConfig.tiny(), seed=0, dtype=torch.float32)
    return path


def _capacity(cluster, args) -> dict:
    return measure_capacity(
        cluster.url, prompts_for(16), args.max_tokens, args.streams, args.seconds, args.warmup_s
    )


def _fault(case: str, cluster, args) -> dict:
    from . import multihost_faults as mf

    hosts, victim = cluster.hosts, 1
    if case.startswith("loss-"):
        return _loss(cluster, args, float(case[5:]))
    fault = mf.host_faults(cluster, victim)[case]
    load = Load(
        cluster.url, prompts_for(16), LoadSpec(max_tokens=args.max_tokens, streams=args.streams)
    ).start()
    try:
        assert load.wait_tokens(1, 120), "the load never streamed"
        result = mf.host_fault(cluster, load, victim, fault.cut, fault.heal, alive=fault.alive)
    finally:
        hosts.heal(victim)
        stuck = load.stop(timeout_s=300)
    failed = [s.error for s in load.snapshot() if s.error]
    return {"case": case, **result, "stuck": stuck, "failed": len(failed)}


def _loss(cluster, args, pct: float) -> dict:
    epoch = cluster.watcher.latest.epoch
    clean = _capacity(cluster, args)
    cluster.hosts.drop(1, pct)
    try:
        lossy = _capacity(cluster, args)
    finally:
        cluster.hosts.drop(1, 0)
    return {
        "case": f"loss-{pct:g}",
        "clean_tokens_per_s": clean["tokens_per_s"],
        "lossy_tokens_per_s": lossy["tokens_per_s"],
        "ratio": round(lossy["tokens_per_s"] / clean["tokens_per_s"], 3),
        "view_changed": cluster.watcher.latest.epoch != epoch,
    }


def _cluster(hosts, model: str, root: str, name: str, layout: dict, fabric: str):
    from .multihost import Layout, MultiHostCluster

    return MultiHostCluster(
        hosts, model, os.path.join(root, name), Layout(layout), fabric=fabric, dtype="float32"
    ).start()


def run(args: argparse.Namespace) -> int:
    from . import netns
    from .recovery_report import provenance

    if reason := netns.available():
        raise SystemExit(f"eep bench multihost: network namespaces are not usable here: {reason}")
    cases = [c for c in args.cases.split(",") if c]
    root = args.log_dir or tempfile.mkdtemp(prefix="eep-bench-multihost-")
    model = _model(root)
    out: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "provenance": provenance(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.node()}",
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "layouts": {"single-host": SINGLE, "cross-host": CROSS},
    }
    with netns.Hosts(3) as hosts:
        single = _cluster(hosts, model, root, "single", SINGLE, "shm")
        try:
            out["single_host"] = _capacity(single, args)
        finally:
            single.stop()
        cross = _cluster(hosts, model, root, "cross", CROSS, "te")
        try:
            out["cross_host"] = _capacity(cross, args)
            out["faults"] = []
            for case in cases:
                print(f"fault {case} ...", flush=True)
                out["faults"].append(_fault(case, cross, args))
                print(json.dumps(out["faults"][-1]), flush=True)
        finally:
            cross.stop()
    ratio = out["cross_host"]["tokens_per_s"] / out["single_host"]["tokens_per_s"]
    out["cross_over_single"] = round(ratio, 3)
    print(
        f"tokens/s: single-host {out['single_host']['tokens_per_s']}, cross-host "
        f"{out['cross_host']['tokens_per_s']} (cross/single {ratio:.3f})"
    )
    path = args.out or os.path.join("docs", "results", f"{out['date']}-cpu-multihost.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}; logs in {root}")
    return 0
