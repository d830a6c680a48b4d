"""``eep bench membership``: kill-to-commit latency of the TTL path and the revoke path.

Starts an etcd (or uses ``--etcd``), a coordinator process and ``--slots`` member processes,
then kills members with SIGKILL one at a time. TTL path: nobody revokes; the lease expires.
Revoke path: the bench acts as the slot's supervisor, reaps the child and revokes its lease.
Each latency runs from the kill to the moment a view without the slot reaches a watcher in
this process. Killed members are restarted and re-admitted between kills.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from .common import add_cluster_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=int, default=20, help="kills per path (default 20)")
    parser.add_argument("--slots", type=int, default=4, help="member processes (default 4)")
    add_cluster_arguments(parser, "ttl")
    parser.add_argument("--debounce", type=float, default=0.05, help="coordinator debounce (s)")
    parser.add_argument(
        "--paths", default="ttl,revoke", help="comma list of ttl,revoke (default both)"
    )
    parser.add_argument("--etcd", default=None, help="use this etcd instead of a local one")
    parser.add_argument("--out", default="bench-membership.json", help="JSON output path")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Bench:
    def __init__(self, endpoint: str, args: argparse.Namespace, workdir: str):
        from eep.membership.etcd import EtcdClient
        from eep.membership.keys import Keys
        from eep.membership.watcher import ViewWatcher

        self.args, self.endpoint, self.workdir = args, endpoint, workdir
        self.cluster = f"bench-{uuid.uuid4().hex[:8]}"
        self.client, self.keys = EtcdClient(endpoint), Keys(self.cluster)
        self.watcher = ViewWatcher(self.client, self.keys).start()
        self.procs: dict[int, subprocess.Popen] = {}
        self.coordinator = self._spawn(
            [
                "eep.tools.cli",
                "coordinator",
                "--ttl",
                str(args.ttl),
                "--debounce",
                str(args.debounce),
            ],
            "coordinator",
        )

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")  # noqa: SIM115
        return subprocess.Popen(
            [sys.executable, "-m", *argv, "--etcd", self.endpoint, "--cluster", self.cluster],
            stdout=log,
            stderr=log,
        )

    def start_member(self, slot: int) -> None:
        self.procs[slot] = self._spawn(
            ["eep.tools.member_proc", "--slot", str(slot), "--ttl", str(self.args.ttl)],
            f"member{slot}",
        )

    def wait(self, predicate, what: str, timeout_s: float):
        view = self.watcher.wait_for(predicate, timeout_s)
        if view is None:
            raise SystemExit(
                f"bench: no view where {what} within {timeout_s} s; logs in {self.workdir}"
            )
        return view

    def kill_once(self, slot: int, revoke: bool) -> float:
        from eep.membership.registry import revoke_slot

        proc = self.procs[slot]
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        if revoke:
            proc.wait(timeout=10)
            revoke_slot(self.client, self.keys, slot)
        self.wait(lambda v: slot not in v.members, f"slot {slot} is gone", self.args.ttl + 15)
        latency = time.monotonic() - killed
        proc.wait(timeout=10)
        self.start_member(slot)
        self.wait(lambda v: slot in v.members, f"slot {slot} is back", 30)
        return latency

    def close(self) -> None:
        self.watcher.stop()
        for proc in [*self.procs.values(), self.coordinator]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def run(args: argparse.Namespace) -> int:
    from eep.membership.server import EtcdServer

    paths = [p for p in args.paths.split(",") if p]
    if not set(paths) <= {"ttl", "revoke"} or args.kills < 1 or args.slots < 2:
        raise SystemExit("bench: --paths takes ttl and/or revoke; --kills >= 1; --slots >= 2")
    workdir = tempfile.mkdtemp(prefix="eep-bench-membership-")
    server = None if args.etcd else EtcdServer(data_dir=workdir).start()
    bench = _Bench(args.etcd or server.endpoint, args, workdir)
    results: dict[str, list[float]] = {}
    try:
        for slot in range(args.slots):
            bench.start_member(slot)
        bench.wait(lambda v: len(v.members) == args.slots, "every slot is in", 30)
        for path in paths:
            results[path] = []
            for i in range(args.kills):
                latency = bench.kill_once(i % args.slots, revoke=(path == "revoke"))
                results[path].append(latency)
                print(
                    f"  {path:6s} kill {i + 1:2d}/{args.kills}: slot {i % args.slots} "
                    f"out of the view after {latency * 1000:7.1f} ms",
                    flush=True,
                )
    finally:
        bench.close()
        if server is not None:
            server.cleanup()
    summary = {
        path: {
            "kills": len(v),
            "p50_s": statistics.median(v),
            "p95_s": _percentile(v, 0.95),
            "max_s": max(v),
            "min_s": min(v),
            "samples_s": v,
        }
        for path, v in results.items()
    }
    print(
        f"\nkill -> view committed and seen, {args.slots} members, TTL {args.ttl} s, "
        f"debounce {args.debounce} s"
    )
    print(f"{'path':8s} {'kills':>5s} {'p50 ms':>9s} {'p95 ms':>9s} {'max ms':>9s} {'p50/TTL':>8s}")
    for path, s in summary.items():
        print(
            f"{path:8s} {s['kills']:5d} {s['p50_s'] * 1e3:9.1f} {s['p95_s'] * 1e3:9.1f} "
            f"{s['max_s'] * 1e3:9.1f} {s['p50_s'] / args.ttl:8.3f}"
        )
    if "ttl" in summary and "revoke" in summary:
        ratio = summary["ttl"]["p50_s"] / summary["revoke"]["p50_s"]
        print(f"revoke path is {ratio:.1f}x faster than waiting for the TTL (p50)")
    with open(args.out, "w") as f:
        json.dump(
            {"ttl_s": args.ttl, "slots": args.slots, "debounce_s": args.debounce, "paths": summary},
            f,
            indent=2,
        )
    print(f"wrote {args.out}")
    return 0
