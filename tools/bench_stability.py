"""``eep bench stability``: no false positives. Clean launches, then steady load, and every view
change beyond the initial one counted.

Nothing is faulted here, so every slot must stay in the first view: a later view means a rank
was excluded (a false fence, a renewal that stalled, a start-up or a long prefill mistaken for
a hang). Each launch is a cluster as ``eep launch`` starts it (torchrun agents, two
coordinators); the last one then serves a closed-loop load for ``--load-s``. The counts are
views after the first, worker incarnations above 1 (restarts), and fence lines in the
workers' logs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

from .common import add_cluster_arguments, new_cluster_name, runtime_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--launches", type=int, default=20, help="clean launches (default 20)")
    parser.add_argument(
        "--load-s", type=float, default=600.0, help="s of steady load on the last (default 600)"
    )
    add_cluster_arguments(parser, "slots", "ttl")
    parser.add_argument("--streams", type=int, default=8, help="requests held at once (8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument("--log-dir", default=None, help="keep the clusters' logs here")
    parser.add_argument("--out", default="bench-stability.json", help="JSON results")


def fence_lines(workdir: str) -> int:
    """Fence lines in the workers' logs under ``workdir``."""
    fences = 0
    for path in glob.glob(os.path.join(workdir, "worker*.log")):
        with open(path, errors="replace") as f:
            text = f.read()
        fences += text.count("past the fence deadline") + text.count("excludes this incarnation")
    return fences


def _count(cluster) -> dict:
    """What betrays a false positive in a cluster that was never faulted."""
    views = cluster.history()
    fences = fence_lines(cluster.workdir)
    latest = views[-1] if views else None
    return {
        "views": len(views),
        "view_changes": max(0, len(views) - 1),
        "restarts": sum(max(0, inc - 1) for _, inc in latest.incarnations) if latest else 0,
        "fences": fences,
        "reasons": [v.reason for v in views[1:]],
    }


def run(args: argparse.Namespace) -> int:
    from eep.launcher import Cluster, ClusterOptions, LaunchError

    from .launch import tiny_model
    from .loadgen import Load, LoadSpec, prompts_for
    from .recovery_report import provenance

    if args.launches < 1 or args.load_s < 0:
        raise SystemExit("eep bench stability: --launches >= 1 and --load-s >= 0")
    model = tiny_model()
    log_root = args.log_dir or tempfile.mkdtemp(prefix="eep-stability-")
    launches, load_result = [], {}
    for i in range(args.launches):
        cfg = runtime_config(args, model, new_cluster_name(f"stable-{i}"))
        opts = ClusterOptions(cfg, torchrun=True, log_dir=os.path.join(log_root, f"launch{i}"))
        started = time.monotonic()
        try:
            cluster = Cluster(opts).start(timeout_s=300)
        except LaunchError as exc:
            launches.append({"launch": i, "error": str(exc)})
            print(f"launch {i}: did not come up: {exc}", flush=True)
            continue
        try:
            up_s = time.monotonic() - started
            time.sleep(2 * cfg.ttl_s)  # past the first lease renewals and fence deadlines
            last = i == args.launches - 1
            if last and args.load_s > 0:
                spec = LoadSpec(max_tokens=args.max_tokens, streams=args.streams)
                load = Load(cluster.url, prompts_for(16), spec).start()
                time.sleep(args.load_s)
                stuck = load.stop(timeout_s=120)
                streams = load.snapshot()
                load_result = {
                    "seconds": args.load_s,
                    "requests": sum(1 for s in streams if s.done and s.error is None),
                    "tokens": sum(len(s.times) for s in streams),
                    "failed": sum(1 for s in streams if s.error),
                    "stuck": stuck,
                }
            entry = {"launch": i, "up_s": round(up_s, 2), **_count(cluster)}
        finally:
            cluster.stop()
        launches.append(entry)
        print(
            f"launch {i}: up in {entry['up_s']:.1f} s; view changes {entry['view_changes']}, "
            f"restarts {entry['restarts']}, fences {entry['fences']}"
            + (f"; load {load_result}" if load_result and i == args.launches - 1 else ""),
            flush=True,
        )
    ok = [x for x in launches if "error" not in x]
    summary = {
        "launches": len(launches),
        "came_up": len(ok),
        "view_changes": sum(x["view_changes"] for x in ok),
        "restarts": sum(x["restarts"] for x in ok),
        "fences": sum(x["fences"] for x in ok),
        "load": load_result,
    }
    with open(args.out, "w") as f:
        json.dump(
            {
                "summary": summary,
                "launches": launches,
                "provenance": provenance(),
                "args": vars(args),
            },
            f,
            indent=2,
            default=str,
        )
    print(f"\nsummary: {json.dumps(summary)}\nwrote {args.out}")
    bad = summary["view_changes"] or summary["restarts"] or summary["fences"]
    return 1 if bad or summary["came_up"] < summary["launches"] else 0
