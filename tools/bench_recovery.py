"""``eep bench recovery``: a rank killed under load, measured against the cluster's capacity.

Each run starts a cluster (``elastic``: one torchrun agent per slot, each slot keeping a warm
standby worker that is promoted when its worker dies; ``elastic-cold``: the same without
standbys, a new worker process starts from nothing; ``baseline``: one torchrun over every
slot, so a failure restarts them all) and, in the default capacity mode,
measures what it serves saturated, then offers an open-loop load at ``--load-factor`` of that:
above what the slots left after the fault can serve, so the dip while a slot is out and the
return after its rejoin are real. The fault is injected into live load and proven to have
landed (``eep.tools.faults``); the load runs on past the rejoin until throughput is back, plus
``--tail``. The report (``recovery_report``) gives the phases, the worst single stream's stall,
served tokens/s in total and per slot, and TTFT/TPOT before, during and after the outage; with
``--repeat N`` the median and max of each over N runs per mode, the runs of the two modes
interleaved so a drift in the machine's load falls on both. The analysis is
``recovery_timeline``, one run is ``recovery_run``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from .common import add_cluster_arguments, runtime_config
from .recovery_settings import MODES, BenchSettings

# per device: sequences one rank decodes at once. Small on the CPU so that a slot's capacity
# is bounded by it (4 ranks share 2 cores; unbounded, three ranks would batch what four did)
MAX_NUM_SEQS = {"cpu": 4, "cuda": 16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--model", default=None, help="HF-style model dir (default: the tiny random model)")
    add_cluster_arguments(parser, "slots", "device", "dtype")
    p(
        "--max-num-seqs",
        type=int,
        default=None,
        help="sequences one rank decodes at once; the rest wait on the rank. It bounds a "
        "slot's capacity, so capacity scales with slots (default 4 on cpu, 16 on cuda)",
    )
    p("--max-tokens", type=int, default=128, help="tokens per request (128)")
    p("--prompts", type=int, default=16, help="distinct prompts, cycled (16)")
    p(
        "--load",
        choices=["open", "closed"],
        default="open",
        help="open (default): requests arrive at --load-factor of the capacity measured "
        "first, whatever the server answers; closed: --streams requests held back to back",
    )
    p(
        "--load-factor",
        type=float,
        default=None,
        help="open loop: offered tokens/s as a share of the measured capacity, in (0, 1]. "
        "Above the share of slots left after the fault, so the outage shows as a dip: "
        "default max(0.9, 1 - failed/(2 x slots)), 0.9 with 4 slots (3 left serve 0.75)",
    )
    p("--rate", type=float, default=None, help="open loop: requests/s, instead of measuring")
    p("--streams", type=int, default=None, help="closed loop: streams (default slots x seqs)")
    p(
        "--capacity-streams",
        type=int,
        default=None,
        help="streams held while measuring capacity (default 2 x slots x --max-num-seqs: "
        "every rank full and as many waiting)",
    )
    p("--capacity-s", type=float, default=6.0, help="s of the capacity measurement (6)")
    p("--capacity-warmup", type=float, default=3.0, help="s of saturation before it (3)")
    p("--fault", choices=["kill", "stop"], default="kill", help="SIGKILL | SIGSTOP the worker")
    p(
        "--slot",
        type=_slot_list,
        default=(2,),
        help="the slot whose worker fails (2); several, comma-separated, fail --stagger apart",
    )
    p("--stagger", type=float, default=0.0, help="s between the faults of several slots (0)")
    p("--warmup", type=float, default=5.0, help="s of load before the pre-fault window (5)")
    p("--at", type=float, default=10.0, help="pre-fault window: the fault this many s later (10)")
    p("--duration", type=float, default=90.0, help="max s after the fault to be back (90)")
    p("--tail", type=float, default=10.0, help="s of load after throughput is back (10)")
    p("--bin", type=float, default=0.5, help="throughput bin, s; slots are polled per bin (0.5)")
    p("--window", type=float, default=3.0, help="sustained window for the 95%% time, s (3)")
    add_cluster_arguments(parser, "ttl", "exchange_timeout", "cuda_graphs", "standby_stage")
    p(
        "--modes",
        default="elastic,baseline",
        help="runs, in order, among elastic (warm standbys), elastic-cold (none) and baseline "
        "(default elastic,baseline)",
    )
    p(
        "--standby",
        default=None,
        help="on, off or on,off: the elastic runs with warm standbys (on), without (off), or "
        "both side by side; replaces the elastic modes of --modes",
    )
    p("--repeat", type=int, default=1, help="runs per mode; the table gives median and max (1)")
    p("--log-dir", default=None, help="keep the clusters' logs here (<dir>/<mode>/run<i>)")
    p("--out", default="bench-recovery.json", help="JSON: every run, the summary, provenance")
    p("--plot", default="bench-recovery.png", help="PNG of served tokens/s ('' for none)")
    p("--table", default=None, help="also write the printed table to this file")


def run(args: argparse.Namespace) -> int:
    from eep.launcher import LaunchError

    from .faults import FaultMissed
    from .loadgen import LoadError, prompts_for
    from .recovery_report import provenance
    from .recovery_run import BenchError, run_once

    settings, modes = _validated(args)
    root = args.log_dir or tempfile.mkdtemp(prefix="eep-bench-recovery-")
    prompts = prompts_for(args.prompts)
    expected = _reference(settings, prompts)
    prov, resolved = provenance(), _resolved(settings)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    failed: list[dict] = []
    for i in range(args.repeat):
        for mode in modes:
            log_dir = os.path.join(root, mode, f"run{i}")
            before = os.getloadavg()[0]  # a busy machine is the usual cause of odd figures
            print(
                f"\n== {mode} run {i + 1}/{args.repeat}: load average {before:.2f}; "
                f"logs in {log_dir}",
                flush=True,
            )
            try:
                record = run_once(settings, mode, log_dir, prompts, expected, _say)
            except (LaunchError, BenchError, FaultMissed, LoadError) as exc:
                print(f"  {mode} run {i + 1}: {exc.__class__.__name__}: {exc}", flush=True)
                failed.append({"mode": mode, "repeat": i, "error": f"{exc}"})
            else:
                loadavg = {"before": before, "after": os.getloadavg()[0]}
                runs[mode].append({"repeat": i, "loadavg_1min": loadavg, **record})
            _write(args, prov, resolved, runs, failed, final=False)  # kept if a later run dies
    if not any(runs.values()):
        return 1
    _write(args, prov, resolved, runs, failed, final=True)
    return 1 if failed else 0


def _validated(args: argparse.Namespace) -> tuple[BenchSettings, list[str]]:
    """Every setting resolved and checked, or a message naming the bad option."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.standby is not None:
        wanted = [w.strip() for w in args.standby.split(",") if w.strip()]
        if not wanted or set(wanted) - {"on", "off"}:
            raise SystemExit(f"eep bench recovery: --standby {args.standby!r}: on, off or on,off")
        elastic = [{"on": "elastic", "off": "elastic-cold"}[w] for w in dict.fromkeys(wanted)]
        modes = elastic + [m for m in modes if m == "baseline"]
    if not modes or set(modes) - set(MODES) or len(set(modes)) != len(modes):
        raise SystemExit(
            f"eep bench recovery: --modes {args.modes!r}: name each run once among "
            f"{', '.join(MODES)}"
        )
    if args.repeat < 1 or args.prompts < 1:
        raise SystemExit(
            f"eep bench recovery: --repeat {args.repeat} and --prompts {args.prompts} must be >= 1"
        )
    try:
        settings = _settings(args)
    except ValueError as exc:
        raise SystemExit(f"eep bench recovery: {exc}") from None
    if settings.load == "open" and settings.load_factor <= settings.survivors_frac:
        print(
            f"note: --load-factor {settings.load_factor:g} is within what the "
            f"{settings.survivors_frac:.0%} of slots left after the fault can serve: the "
            "outage will hardly show in throughput"
        )
    return settings, modes


def _settings(args: argparse.Namespace) -> BenchSettings:
    from .launch import tiny_model

    seqs = _given(args.max_num_seqs, MAX_NUM_SEQS[args.device])
    model_path = args.model or tiny_model()
    # the runtime settings resolved by the one builder; each run's cluster is built from them
    # again, per mode (recovery_run._runtime). exact: outputs are checked token for token
    cfg = runtime_config(args, model_path, "bench", exact=True)
    args.cuda_graphs = cfg.cuda_graphs  # resolved, so the JSON says what ran
    args.standby_stage = cfg.standby_stage
    slots, failed = cfg.num_slots, len(args.slot)
    return BenchSettings(
        model_path=cfg.model_path,
        dtype=cfg.dtype,
        device=cfg.device,
        num_slots=slots,
        max_num_seqs=seqs,
        max_tokens=args.max_tokens,
        ttl_s=cfg.ttl_s,
        exchange_timeout_s=cfg.exchange_timeout_s,
        cuda_graphs=cfg.cuda_graphs,
        standby_stage=cfg.standby_stage,
        fault=args.fault,
        failed_slots=tuple(args.slot),
        stagger_s=args.stagger,
        load=args.load,
        streams=_given(args.streams, slots * seqs),
        load_factor=_given(args.load_factor, max(0.9, 1 - failed / (2 * slots))),
        rate=args.rate,
        capacity_streams=_given(args.capacity_streams, 2 * slots * seqs),
        capacity_s=args.capacity_s,
        capacity_warmup_s=args.capacity_warmup,
        warmup_s=args.warmup,
        at_s=args.at,
        duration_s=args.duration,
        tail_s=args.tail,
        bin_s=args.bin,
        window_s=args.window,
    )


def _given(value, default):
    return default if value is None else value


def _resolved(s: BenchSettings) -> dict:
    from dataclasses import asdict

    return {**asdict(s), "failed_slots": list(s.failed_slots)}


def _reference(s: BenchSettings, prompts: list[list[int]]) -> list[list[int]]:
    import torch

    from eep.engine.reference import single_process_outputs
    from eep.engine.sampling import SamplingParams

    print(f"reference: {len(prompts)} prompts x {s.max_tokens} tokens, one process", flush=True)
    device = "cuda" if s.device == "cuda" else "cpu"
    params = [SamplingParams(max_tokens=s.max_tokens)] * len(prompts)
    out = single_process_outputs(s.model_path, prompts, params, getattr(torch, s.dtype), device)
    if s.device == "cuda":
        torch.cuda.empty_cache()  # the reference held the whole model on GPU 0: give it back
    return out


def _say(text: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _write(args, prov: dict, resolved: dict, runs: dict, failed: list, final: bool) -> None:
    """The report of the runs done so far: JSON and plot each time, the table at the end."""
    from .recovery_report import plot, report, table

    arguments = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    rep = report(prov, arguments, resolved, runs, failed)
    with open(args.out, "w") as f:
        json.dump(rep, f, indent=1)
    if args.plot:
        why = plot(runs, resolved, args.plot)
        if why and final:
            print(why)
    if final:
        text = table(rep)
        print("\n" + text)
        if args.table:
            with open(args.table, "w") as f:
                f.write(text + "\n")
        print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


def _slot_list(text: str) -> tuple[int, ...]:
    try:
        slots = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: slots are integers, comma-separated") from None
    if len(set(slots)) != len(slots):
        raise argparse.ArgumentTypeError(f"{text!r} names a slot twice")
    return slots
