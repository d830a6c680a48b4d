"""``eep bench chaos``: a fault matrix, named cases x repeats, every invariant checked per run.

Each case gets a fresh cluster of ``--slots`` CPU ranks (each under its own torchrun agent,
``max_restarts`` 1000 so repeats never exhaust torchrun; float64, the tiny random model) and
runs ``--repeat`` times on it. A run holds closed-loop load (``--streams`` requests of
``--max-tokens`` over ``prompts_for(16)``), injects the case's faults into live load (only
once the target slot streams), waits until every faulted slot is back in a full view with a
new incarnation, then for ``--tail-tokens`` more tokens, and drains the load. A run whose
fault or premise missed (``FaultMissed``) or that broke is failed, and the case's cluster is
started afresh for the next repeat.

Cases (``--cases``; slot A is ``repeat % slots``, slot B the next one):
- ``worker-kill``: SIGKILL A's worker; its supervisor revokes the lease at once.
- ``worker-stop``: SIGSTOP A's worker; the supervisor stops renewing, the lease expires, the
  supervisor kills the hung worker (checked: the stopped pid is gone) and starts another.
- ``supervisor-kill``: SIGKILL A's supervisor; the worker dies with it (checked), the lease
  expires after the TTL, torchrun restarts the supervisor.
- ``agent-kill``: SIGKILL A's torchrun agent; the supervisor gets SIGTERM by parent-death
  signal (checked: it exits), ends its worker and revokes the lease; the agent is started
  again as a pod controller would.
- ``two-in-ttl``: SIGKILL A's and B's workers, the second within one TTL of the first.
- ``kill-during-rejoin``: SIGKILL A's worker; once a view excludes it, SIGKILL B's while A's
  next worker starts; invalid (failed) if a committed view already held A's new incarnation.
- ``rejoiner-killed-mid-pull``: SIGKILL A's worker; when A's next worker logs
  ``pull_started`` and not ``weights_loaded``, SIGKILL it; a third incarnation must rejoin.
- ``source-killed-mid-pull``: SIGKILL A's worker; while A's next worker holds its planned
  pull open, SIGKILL a source it planned to read; the same incarnation must finish the pull
  (``weights_loaded`` names the dead source as failed: it was re-planned around) and rejoin.
The two pull cases run with ``RuntimeConfig.pull_hold_s = --pull-hold``: the tiny model's
pull takes milliseconds, so a rejoining worker holds its planned pull open that long.

Invariants, each a count that must be 0 (summed per case in the table):
- ``lost``: a stream that ended with an error, never ended, or got fewer tokens than the
  fault-free reference (``single_process_outputs``, computed once);
- ``dup_skip``: per stream, tokens past the common prefix with the reference, plus the
  reference tokens a cleanly ended stream is missing (counted by the client);
- ``differ``: cleanly ended streams whose tokens differ from the reference;
- ``stale``: growth of the front-end's ``eep_stale_accepted_total`` (tokens accepted from a
  slot incarnation the current view excludes);
- ``epochs``: the run's committed epochs not exactly consecutive, views the watcher
  delivered not going up by one, or differing from the history's view of their epoch;
- ``orphans``: committed views whose placement orphans an expert but were not treated as
  degraded. A view carries no 'degraded' mark: each member derives it from the placement
  (``Worker.apply``) and pauses. So a violation is an orphaning view a member applied without
  logging ``degraded``, or during which the client got a token (from 0.5 s after the last
  member applied it, the pipes' grace, until the next view arrived);
- ``collateral``: slot incarnations that left a view during the run though no fault of the
  run hit them (a survivor that crashed, was fenced or lost its lease: the load recovers
  around it, so the invariants above can all hold while it happened).
Besides: ``missed`` (a fault that did not land on live load, :func:`eep.tools.faults.prove`)
and ``errors`` (a run that broke: the cluster did not do what the case expects, or timed
out). The exit code is 1 if any of these is non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from eep.config import default_dtype

from .chaos_cases import CASES, PULL_CASES, CaseFailed, CaseResult, Ctx
from .chaos_checks import (
    RunSpan,
    collateral_exits,
    epoch_violations,
    fault_timings,
    orphan_violations,
    stream_counts,
)
from .chaos_report import failed, header, table, totals
from .common import add_cluster_arguments, new_cluster_name, runtime_config, scrape_metrics
from .faults import FaultMissed

PROMPTS = 16  # distinct prompts, cycled by the load
DTYPE = default_dtype("cpu", exact=True)  # float64: the outputs are checked token for token
MAX_RESTARTS = 1000  # torchrun's restarts of a supervisor: repeats must never exhaust them

_EPILOG = """\
cases (slot A = repeat % slots, B = the next slot):
  worker-kill               SIGKILL A's worker (the supervisor revokes its lease at once)
  worker-stop               SIGSTOP A's worker (lease expiry; the supervisor kills it)
  supervisor-kill           SIGKILL A's supervisor (worker dies with it; lease expires)
  agent-kill                SIGKILL A's torchrun agent, then start it again
  two-in-ttl                SIGKILL A's and B's workers within one TTL
  kill-during-rejoin        SIGKILL A's worker, then B's while A's next one starts
  rejoiner-killed-mid-pull  SIGKILL A's worker, then its successor mid-pull
  source-killed-mid-pull    SIGKILL A's worker, then a source of its successor's pull
invariants (each must be 0): lost, dup_skip, differ, stale, epochs, orphans, collateral;
and missed (a fault that did not land on live load), errors (a run that broke). Exit code 1
if any is not 0. The definitions are in the module docstring (eep/tools/bench_chaos.py)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated cases to run, in order (default all: {', '.join(CASES)})",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (default 3)")
    add_cluster_arguments(parser, "slots")  # CPU ranks; >= 3 here
    parser.add_argument(
        "--streams", type=int, default=8, help="requests held at once (closed loop) (default 8)"
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument(
        "--tail-tokens",
        type=int,
        default=64,
        help="tokens streamed after full recovery before a run ends (default 64)",
    )
    add_cluster_arguments(parser, "ttl")
    parser.add_argument(
        "--pull-hold",
        type=float,
        default=3.0,
        metavar="S",
        help="s a rejoining worker holds its planned pull open in the mid-pull cases, the "
        "window to kill it or its source in (default 3)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="longest wait for any one state (load on a slot, a view, a rejoin) (default 180)",
    )
    parser.add_argument("--log-dir", default=None, help="keep the clusters' logs here")
    parser.add_argument("--out", default="bench-chaos.json", help="JSON results")
    parser.add_argument("--table", default=None, help="also write the printed table here")


def check_args(args: argparse.Namespace) -> list[str]:
    """The cases to run; a bad argument is a ``SystemExit`` that says what to give."""
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if not cases or unknown:
        _bad(f"--cases {args.cases!r}: name cases among {', '.join(CASES)}")
    if len(set(cases)) != len(cases):
        _bad(f"--cases {args.cases!r} names a case twice; use --repeat for more runs")
    if args.slots < 3:
        _bad("--slots must be >= 3: a two-slot case needs a survivor to serve the load")
    for name in ("repeat", "streams", "max_tokens"):
        if getattr(args, name) < 1:
            _bad(f"--{name.replace('_', '-')} must be >= 1")
    if args.tail_tokens < 0 or args.ttl < 1 or not args.timeout > 0:
        _bad("--tail-tokens must be >= 0, --ttl >= 1 and --timeout > 0")
    if not args.pull_hold > 0 and set(cases) & set(PULL_CASES):
        _bad(f"--pull-hold must be > 0 s for {' and '.join(PULL_CASES)} (the kill window)")
    return cases


def _bad(message: str) -> None:
    raise SystemExit(f"eep bench chaos: {message}")


def run(args: argparse.Namespace) -> int:
    cases = check_args(args)
    import torch

    from eep.engine.reference import single_process_outputs
    from eep.engine.sampling import SamplingParams

    from .launch import tiny_model
    from .loadgen import prompts_for

    args.model = os.path.abspath(tiny_model())
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="eep-bench-chaos-")
    args.cases = ",".join(cases)
    prompts = prompts_for(PROMPTS)
    print(f"reference: {PROMPTS} prompts x {args.max_tokens} tokens, one process", flush=True)
    params = [SamplingParams(max_tokens=args.max_tokens)] * PROMPTS
    expected = single_process_outputs(args.model, prompts, params, getattr(torch, DTYPE))
    report = header({k: v for k, v in vars(args).items() if not k.startswith("_")})
    report["setup"] = {
        "cluster_per_case": True,  # a failed run also gets the next repeat a fresh one
        "torchrun": True,
        "max_restarts": MAX_RESTARTS,
        "dtype": DTYPE,
        "prompts": PROMPTS,
        "pull_hold_s": {c: args.pull_hold if c in PULL_CASES else 0.0 for c in cases},
    }
    report.update(runs=[], totals={})
    for case in cases:
        _run_case(case, args, prompts, expected, report)
    text = table(report["totals"])
    print("\n" + text + f"\n\nwrote {args.out}; logs in {args.log_dir}", flush=True)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    return 1 if failed(report["totals"]) else 0


def _write(args: argparse.Namespace, report: dict) -> None:
    report["totals"] = totals(report["runs"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def _run_case(case: str, args, prompts, expected, report: dict) -> None:
    cluster, seen = None, []
    try:
        for repeat in range(args.repeat):
            try:
                if cluster is None:
                    cluster, seen = _start(case, args, serial=len(report["runs"]))
                record = _run_once(cluster, seen, case, repeat, args, prompts, expected)
            except (OSError, RuntimeError) as exc:  # the cluster or its front-end broke
                record = _broken(case, repeat, exc)
            report["runs"].append(record)
            _write(args, report)  # kept if a later run dies
            _print_run(record)
            if (record["missed"] or record["error"]) and cluster is not None:
                cluster.stop()  # a failed run may leave it broken: the next gets a fresh one
                cluster = None
    finally:
        if cluster is not None:
            cluster.stop()


def _broken(case: str, repeat: int, exc: Exception) -> dict:
    """The record of a run that could not even be judged."""
    return {
        "case": case,
        "repeat": repeat,
        "missed": None,
        "error": f"{exc.__class__.__name__}: {exc}",
        "invariants": {},
        "landed": 0,
        "injected": 0,
        "timings": [],
        "slots_hit": [],
        "requests": 0,
        "tokens": 0,
    }


def _start(case: str, args, serial: int):
    from eep.launcher import Cluster, ClusterOptions

    cfg = runtime_config(
        args,
        args.model,
        new_cluster_name(f"chaos-{serial}"),
        dtype=DTYPE,
        pull_hold_s=args.pull_hold if case in PULL_CASES else 0.0,
    )
    log_dir = os.path.join(args.log_dir, f"{case}-{serial}")
    opts = ClusterOptions(cfg, torchrun=True, max_restarts=MAX_RESTARTS, log_dir=log_dir)
    started = time.monotonic()
    cluster = Cluster(opts).start(timeout_s=args.timeout)
    seen: list = []
    cluster.watcher.on_view = lambda v: seen.append((time.monotonic(), v))
    print(
        f"\n== {case}: {args.slots} slots up in {time.monotonic() - started:.1f} s; logs in "
        f"{log_dir}",
        flush=True,
    )
    return cluster, seen


def _run_once(cluster, seen, case, repeat, args, prompts, expected) -> dict:
    from eep.membership.commit import read_view

    from .loadgen import Load, LoadSpec

    record = {"case": case, "repeat": repeat, "missed": None, "error": None}
    before = _counters(cluster.url)
    epoch_before = read_view(cluster.client, cluster.keys)[0].epoch
    spec = LoadSpec(max_tokens=args.max_tokens, streams=args.streams)
    load = Load(cluster.url, prompts, spec).start()
    result = CaseResult([])
    ctx = Ctx(cluster, repeat, args.ttl, args.timeout)
    landed = 0
    try:
        if not load.wait_tokens(1, args.timeout):
            raise CaseFailed("the load never streamed a token")
        result = CASES[case](ctx)
        landed = _recover(cluster, load, result, args)
    except FaultMissed as exc:
        record["missed"] = str(exc)
    except (CaseFailed, OSError, RuntimeError) as exc:
        record["error"] = f"{exc.__class__.__name__}: {exc}"
    finally:
        stuck = load.stop(timeout_s=args.timeout)
    record.update(
        _judge(cluster, seen, load, expected, before, epoch_before, result, args),
        landed=landed + len(result.side),
        injected=len(result.faults) + len(result.side),
        stuck=stuck,
        seconds=round(time.monotonic() - load.started, 2),
    )
    return record


def _recover(cluster, load, result: CaseResult, args) -> int:
    """Every faulted slot back, the case's checks, the faults proven, then the tail of
    tokens; returns how many faults were proven to have landed."""
    from . import faults

    for fault in result.faults:
        faults.wait_rejoined(cluster, fault, timeout_s=args.timeout)
    for check in result.checks:
        check()
    for fault in result.faults:
        faults.prove(fault, load, cluster.url)
    streamed = sum(len(s.times) for s in load.snapshot())
    if not load.wait_tokens(streamed + args.tail_tokens, args.timeout):
        raise CaseFailed(f"fewer than {args.tail_tokens} tokens streamed after the recovery")
    return len(result.faults)


def _judge(cluster, seen, load, expected, before, epoch_before, result, args) -> dict:
    """Every invariant of the run (see the module docstring) and the fault timings."""
    from eep.events import read_events

    after = _counters(cluster.url)
    history = cluster.history()
    wall_offset = time.time() - time.monotonic()
    span = RunSpan(load.started, time.monotonic(), epoch_before, args.slots)
    mine = [(t, v) for t, v in list(seen) if span.t0 <= t <= span.t1]
    streams = load.snapshot()
    invariants = stream_counts(streams, expected)
    invariants["stale"] = int(after["stale_accepted"] - before["stale_accepted"])
    invariants["epochs"] = epoch_violations(history, mine, span)
    events = read_events(cluster.workdir)
    invariants["orphans"], orphan_views = orphan_violations(
        history, mine, events, load.token_times(), span
    )
    faulted = {(f.slot, f.old_incarnation) for f in result.faults}
    collateral = collateral_exits(history, span, faulted)
    invariants["collateral"] = len(collateral)
    return {
        "slots_hit": [f.slot for f in result.faults],
        "invariants": invariants,
        "timings": [fault_timings(f, history, wall_offset, args.slots) for f in result.faults],
        "faults": [f.to_dict() for f in result.faults] + result.side,
        "proofs": result.proofs,
        "orphan_views": orphan_views,
        "collateral_exits": collateral,
        "epochs": [v.epoch for v in history if v.epoch > epoch_before],
        "requests": len(streams),
        "tokens": sum(len(s.tokens) for s in streams),
        "frontend": {k: int(after[k] - before[k]) for k in after},
    }


def _counters(url: str) -> dict[str, float]:
    """The front-end counters a run reads before and after itself."""
    m = scrape_metrics(url)
    return {
        "stale_accepted": m["eep_stale_accepted_total"],
        "duplicates_dropped": m["eep_duplicate_tokens_total"],
        "stale_dropped": m["eep_stale_tokens_total"],
        "requeued": m["eep_requeued_total"],
        "migrated": m["eep_migrated_total"],
    }


def _print_run(r: dict) -> None:
    bad = {k: v for k, v in r["invariants"].items() if v}
    verdict = r["missed"] or r["error"] or (f"VIOLATED {bad}" if bad else "ok")
    times = " ".join(
        f"slot {s}: excluded {t['excluded_s']} s, rejoined {t['rejoined_s']} s"
        for s, t in zip(r["slots_hit"], r["timings"], strict=True)
    )
    print(
        f"  {r['case']} #{r['repeat']}: {r['requests']} requests, {r['tokens']} tokens, "
        f"faults landed {r['landed']}/{r['injected']}; {times}; {verdict}",
        flush=True,
    )
