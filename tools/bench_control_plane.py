"""``eep bench control-plane``: what a control-plane fault costs the tokens, as a timeline.

Each case gets a fresh cluster as ``eep launch`` starts it (torchrun agents, two
coordinators, the tiny model on ``--slots`` CPU ranks) serving a closed-loop load of
``--streams`` requests. After ``--warm-s`` of steady load the case's fault is injected, the
load runs on for ``--after-s``, and the tokens/s every client received are binned around the
fault. Nothing is compared with a baseline here: the question is whether the fault costs
anything at all, so each case is measured against its own steady rate before the fault.

Cases (``--cases``):
- ``etcd-stall-<N>``: the embedded etcd SIGSTOPped for N s (leases expire as it resumes;
  the supervisors re-attach them), any N, e.g. 2, 5, 10;
- ``etcd-leader-kill``: a 3-member etcd cluster on loopback; its leader SIGKILLed, then
  started again (same ports and data) after ``--after-s``/2;
- ``etcd-quorum-loss-<N>``: the same cluster with two members SIGSTOPped for N s;
- ``frontend-kill``: the front-end SIGKILLed; the launcher starts it again on the same port;
- ``coordinator-worker-kill``: the leading coordinator and slot 1's worker SIGKILLed together.

Per case it reports: the steady rate before, the rate during the fault window and after, the
longest time no client received a token, view changes, worker restarts, fence lines in the
workers' logs, requests failed (split into those cut by a front-end kill and the rest),
and how long until a request sent after the fault got its first token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time

from .bench_stability import fence_lines
from .common import add_cluster_arguments, new_cluster_name, runtime_config
from .recovery_timeline import longest_gap, rates

DEFAULT_CASES = (
    "etcd-stall-2,etcd-stall-5,etcd-stall-10,etcd-leader-kill,etcd-quorum-loss-5,"
    "frontend-kill,coordinator-worker-kill"
)
_CASE = re.compile(
    r"^(etcd-stall-(\d+(\.\d+)?)|etcd-quorum-loss-(\d+(\.\d+)?)|etcd-leader-kill|frontend-kill"
    r"|coordinator-worker-kill)$"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"comma-separated cases (default {DEFAULT_CASES})"
    )
    add_cluster_arguments(parser, "slots", "ttl")
    parser.add_argument("--streams", type=int, default=8, help="requests held at once (8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument("--warm-s", type=float, default=8.0, help="steady load before (8 s)")
    parser.add_argument("--after-s", type=float, default=15.0, help="load after the fault (15)")
    parser.add_argument("--bin-s", type=float, default=0.5, help="timeline bin (0.5 s)")
    parser.add_argument("--log-dir", default=None, help="keep the clusters' logs here")
    parser.add_argument("--out", default="bench-control-plane.json", help="JSON results")
    parser.add_argument("--plot", default="bench-control-plane.png", help="PNG ('' for none)")


def _cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if not _CASE.match(c)]
    if bad or not cases:
        raise SystemExit(f"eep bench control-plane: unknown cases {bad}; see --help")
    return cases


def _seconds(case: str) -> float:
    return float(case.rsplit("-", 1)[1])


def _inject(case: str, cluster, etcd_cluster) -> tuple[float, float, dict]:
    """Start the fault; returns ``(fault_at, window_end, notes)`` once the fault is over (or,
    for kills, at once: their window is the recovery)."""
    notes: dict = {}
    if case.startswith("etcd-stall-"):
        pid = cluster.etcd_server.pid
        at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        time.sleep(_seconds(case))
        os.kill(pid, signal.SIGCONT)
        return at, time.monotonic(), notes
    if case.startswith("etcd-quorum-loss-"):
        leader = etcd_cluster.leader()
        others = [i for i in range(len(etcd_cluster.members)) if i != leader][:2]
        at = time.monotonic()
        for i in others:
            etcd_cluster.pause(i)
        time.sleep(_seconds(case))
        for i in others:
            etcd_cluster.resume(i)
        notes["paused_members"] = others
        return at, time.monotonic(), notes
    if case == "etcd-leader-kill":
        leader = etcd_cluster.leader()
        at = time.monotonic()
        etcd_cluster.kill(leader)
        etcd_cluster.wait_leader(timeout_s=30)
        notes.update(killed_member=leader, new_leader=etcd_cluster.leader())
        notes["new_leader_after_s"] = round(time.monotonic() - at, 3)
        return at, at, notes
    if case == "frontend-kill":
        proc = cluster.procs["frontend"]
        at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        notes["killed_pid"] = proc.pid
        return at, at, notes
    # coordinator-worker-kill
    identity = cluster.client.get(cluster.keys.coordinator).json()["identity"]
    name = "coordinator" if identity == "coordinator0" else identity
    worker = cluster.wait_worker_pid(1)
    at = time.monotonic()
    os.kill(cluster.procs[name].pid, signal.SIGKILL)
    os.kill(worker, signal.SIGKILL)
    notes.update(killed_coordinator=identity, killed_worker_pid=worker)
    return at, at, notes


def run_case(case: str, args, model: str, log_root: str) -> dict:
    from eep.launcher import Cluster, ClusterOptions
    from eep.membership.server import EtcdCluster

    from . import faults
    from .loadgen import Load, LoadSpec, prompts_for

    cfg = runtime_config(args, model, new_cluster_name("cp"))
    workdir = os.path.join(log_root, case)
    etcd_cluster = None
    if case == "etcd-leader-kill" or case.startswith("etcd-quorum-loss-"):
        etcd_cluster = EtcdCluster(3, base_dir=os.path.join(workdir, "etcd-cluster")).start()
    opts = ClusterOptions(
        cfg,
        etcd=etcd_cluster.endpoints if etcd_cluster else None,
        torchrun=True,
        log_dir=workdir,
    )
    cluster = Cluster(opts).start(timeout_s=300)
    try:
        # the standbys start behind the ready workers: warm them first, or their imports
        # would eat into the steady rate the fault is measured against
        faults.wait_standbys(cluster)
        epoch0 = cluster.history()[-1].epoch
        spec = LoadSpec(max_tokens=args.max_tokens, streams=args.streams)
        load = Load(cluster.url, prompts_for(16), spec).start()
        if not load.wait_tokens(1, 120):
            raise RuntimeError(f"{case}: the load never streamed a token")
        time.sleep(args.warm_s)
        at, window_end, notes = _inject(case, cluster, etcd_cluster)
        if case == "etcd-leader-kill":
            time.sleep(args.after_s / 2)
            etcd_cluster.restart(notes["killed_member"])
            time.sleep(args.after_s / 2)
        else:
            time.sleep(args.after_s)
        stuck = load.stop(timeout_s=120)
        streams = load.snapshot()
        end = time.monotonic()
        result = _measure(case, args, streams, at, window_end, end, stuck)
        views = cluster.history()
        latest = views[-1]
        result.update(
            notes=notes,
            view_changes=latest.epoch - epoch0,
            view_reasons=[v.reason for v in views if v.epoch > epoch0],
            restarts=sum(max(0, inc - 1) for _, inc in latest.incarnations),
            fences=fence_lines(cluster.workdir),
            frontend_restarts=getattr(cluster, "restarts", {}).get("frontend", 0),
        )
        return result
    finally:
        cluster.stop()
        if etcd_cluster is not None:
            etcd_cluster.cleanup()


def _measure(case, args, streams, at, window_end, end, stuck) -> dict:
    times = sorted(t for s in streams for t in s.times)
    t0 = at - args.warm_s
    curve = rates(times, t0, end, args.bin_s)
    pre = rates(times, t0, at, args.warm_s)
    window = max(window_end - at, args.bin_s)
    during = rates(times, at, at + window, window)
    after = rates(times, window_end + 2.0, end, max(end - window_end - 2.0, args.bin_s))
    gap = longest_gap(times, at, end)
    cut = [s for s in streams if s.error and s.started < at and (s.ended or end) >= at]
    failed_later = [s for s in streams if s.error and s.started >= at]
    first_after = min((s.times[0] for s in streams if s.started >= at and s.times), default=None)
    return {
        "case": case,
        "window_s": round(window_end - at, 3),
        "steady_tok_s": round(pre[0], 1) if pre else None,
        "during_tok_s": round(during[0], 1) if during else None,
        "after_tok_s": round(after[0], 1) if after else None,
        "longest_no_token_s": round(gap[1] - gap[0], 3) if gap else None,
        "first_token_of_a_new_request_s": None
        if first_after is None
        else round(first_after - at, 3),
        "requests": len(streams),
        "failed_cut_in_flight": len(cut),
        "failed_other": sum(1 for s in streams if s.error) - len(cut),
        "failed_after_fault": len(failed_later),
        "stuck": stuck,
        "timeline": {
            "t_rel_s": [round(-args.warm_s + i * args.bin_s, 3) for i in range(len(curve))],
            "tok_s": [round(x, 1) for x in curve],
        },
    }


def plot(results: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    ok = [r for r in results if "timeline" in r]
    if not ok:
        return "no case finished: no plot"
    fig, axes = plt.subplots(len(ok), 1, figsize=(9, 2.2 * len(ok)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], ok, strict=True):
        ax.plot(r["timeline"]["t_rel_s"], r["timeline"]["tok_s"], drawstyle="steps-post")
        ax.axvspan(0, max(r["window_s"], 0.05), color="tab:red", alpha=0.2)
        ax.set_ylabel("tok/s")
        ax.set_title(
            f"{r['case']}: longest gap {r['longest_no_token_s']} s, views +{r['view_changes']},"
            f" restarts {r['restarts']}, fences {r['fences']}",
            fontsize=9,
        )
        ax.set_ylim(bottom=0)
    axes[-1, 0].set_xlabel("s since the fault (red: the fault's window)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def run(args: argparse.Namespace) -> int:
    from .launch import tiny_model
    from .recovery_report import provenance

    # SIGTERM unwinds like Ctrl-C, so every cluster started so far is stopped (its processes
    # run in sessions of their own and would outlive the bench)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    cases = _cases(args.cases)
    if args.warm_s < 1 or args.after_s < 4 or args.bin_s <= 0:
        raise SystemExit("eep bench control-plane: --warm-s >= 1, --after-s >= 4, --bin-s > 0")
    model = tiny_model()
    log_root = args.log_dir or tempfile.mkdtemp(prefix="eep-control-plane-")
    results = []
    for case in cases:
        print(f"{case}: starting a cluster ...", flush=True)
        try:
            r = run_case(case, args, model, log_root)
        except Exception as exc:  # one broken case must not lose the others' figures
            r = {"case": case, "error": f"{exc.__class__.__name__}: {exc}"}
            print(f"{case}: FAILED: {r['error']} (logs in {log_root}/{case})", flush=True)
        else:
            print(
                f"{case}: steady {r['steady_tok_s']} tok/s, during {r['during_tok_s']}, after "
                f"{r['after_tok_s']}; longest gap {r['longest_no_token_s']} s; views "
                f"+{r['view_changes']}, restarts {r['restarts']}, fences {r['fences']}, failed "
                f"{r['failed_cut_in_flight']} cut + {r['failed_other']} other; new request's "
                f"first token {r['first_token_of_a_new_request_s']} s after",
                flush=True,
            )
        results.append(r)
        with open(args.out, "w") as f:
            json.dump(
                {"cases": results, "provenance": provenance(), "args": vars(args)},
                f,
                indent=2,
                default=str,
            )
    why = plot(results, args.plot) if args.plot else None
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot and not why else ""))
    if why:
        print(why)
    return 1 if any("error" in r for r in results) else 0
