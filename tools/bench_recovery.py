"""``eep bench recovery``: a rank killed under load, per-phase timeline vs the full restart.

Each mode starts a cluster (``elastic``: one torchrun agent per slot; ``baseline``: one
torchrun over every slot, so a failure restarts them all), drives a steady streamed load
through the HTTP API (a pool of client threads, requests back to back, every token's arrival
time recorded), SIGKILLs or SIGSTOPs one slot's worker (or several: ``--slot 1,2``,
``--stagger`` seconds apart), and keeps the load running until the failed slots are back in
the view and throughput is back to >= 95% of the pre-fault rate (or ``--duration``). Phases
come from the processes' event logs (``eep.events``), the view history in etcd and the token
arrival times, all on the host's monotonic clock. Both runs are printed side by side with the
ratios, and written as JSON and a PNG.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from .common import add_data_plane_arguments, cuda_graphs, exchange_timeout_s, scrape_metrics

MODES = ("elastic", "baseline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF-style model dir (default: tiny random)")
    parser.add_argument("--slots", type=int, default=4, help="EP slots (default 4)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default=None, help="default float64 on cpu, bfloat16 on cuda")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts, cycled (16)")
    parser.add_argument("--fault", choices=["kill", "stop"], default="kill", help="SIGKILL|SIGSTOP")
    parser.add_argument(
        "--slot",
        type=_slot_list,
        default=(2,),
        help="the slot whose worker fails (2); several, comma-separated, fail --stagger apart",
    )
    parser.add_argument(
        "--stagger", type=float, default=0.0, help="s between the faults of several slots (0)"
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="s before steady state (5)")
    parser.add_argument("--at", type=float, default=20.0, help="fault, s after steady state (20)")
    parser.add_argument("--duration", type=float, default=90.0, help="max s after the fault (90)")
    parser.add_argument("--tail", type=float, default=10.0, help="s of load after recovery (10)")
    parser.add_argument("--bin", type=float, default=0.5, help="throughput bin in s (0.5)")
    parser.add_argument("--window", type=float, default=3.0, help="recovery window in s (3)")
    parser.add_argument("--ttl", type=int, default=3, help="lease TTL in s (3)")
    add_data_plane_arguments(parser)
    parser.add_argument("--modes", default="elastic,baseline", help="runs, in order")
    parser.add_argument("--log-dir", default=None, help="keep the clusters' logs here")
    parser.add_argument("--out", default="bench-recovery.json", help="JSON results")
    parser.add_argument("--plot", default="bench-recovery.png", help="PNG of throughput")


class BenchError(RuntimeError):
    """The benchmark could not run; the message says what to change."""


# --- the load ------------------------------------------------------------------------------


@dataclass
class Stream:
    client_idx: int
    prompt_idx: int
    started: float
    request_id: str = ""
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None


class Load:
    """``clients`` threads, each streaming requests back to back until :meth:`stop`."""

    def __init__(self, url: str, prompts: list[list[int]], clients: int, max_tokens: int):
        self.url, self.prompts, self.max_tokens = url, prompts, max_tokens
        self.streams: list[Stream] = []
        self.first_done: dict[int, float] = {}
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(i,), name=f"client{i}", daemon=True)
            for i in range(clients)
        ]

    def start(self) -> Load:
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def _client(self, idx: int) -> None:
        import requests

        with requests.Session() as http:
            while not self._stop.is_set():
                with self._lock:
                    k = next(self._next)
                    st = Stream(idx, k % len(self.prompts), time.monotonic())
                    self.streams.append(st)
                try:
                    self._request(http, st)
                except (requests.RequestException, ValueError, KeyError) as exc:
                    st.error = f"{exc.__class__.__name__}: {exc}"
                    self._stop.wait(0.2)
                self.first_done.setdefault(idx, time.monotonic())

    def _request(self, http, st: Stream) -> None:
        body = {"prompt": self.prompts[st.prompt_idx], "max_tokens": self.max_tokens}
        # the read timeout bounds the wait between two bytes: a full restart must fit in it
        with http.post(
            f"{self.url}/v1/completions",
            json={**body, "stream": True},
            stream=True,
            timeout=(10, 300),
        ) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                st.times.append(time.monotonic())
                st.request_id = chunk["id"]
                st.tokens.append(chunk["choices"][0]["token_ids"][0])
                st.finish = chunk["choices"][0]["finish_reason"]

    def wait_steady(self, warmup_s: float, timeout_s: float) -> float:
        """Steady state: ``warmup_s`` passed and every client has finished one request."""
        deadline = time.monotonic() + timeout_s
        while len(self.first_done) < len(self.threads) or time.monotonic() < (
            self.started + warmup_s
        ):
            if time.monotonic() > deadline:
                raise BenchError(
                    f"only {len(self.first_done)}/{len(self.threads)} clients finished a request "
                    f"within {timeout_s:.0f} s; lower --clients/--max-tokens or read the logs"
                )
            time.sleep(0.05)
        return time.monotonic()

    def token_times(self) -> list[float]:
        return sorted(t for st in list(self.streams) for t in st.times)

    def stop(self, timeout_s: float) -> int:
        """Stop issuing requests, let those in flight finish; returns the clients still stuck."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self.threads)


# --- analysis (pure) -----------------------------------------------------------------------


def rates(times: list[float], t0: float, t1: float, bin_s: float) -> list[float]:
    """Tokens/s in consecutive bins of ``bin_s`` from ``t0`` up to ``t1``."""
    counts = [0] * max(0, int((t1 - t0) / bin_s))
    for t in times:
        i = int((t - t0) / bin_s)
        if 0 <= i < len(counts) and t >= t0:
            counts[i] += 1
    return [c / bin_s for c in counts]


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float] | None:
    """The longest gap between consecutive tokens (all streams merged) that ends after
    ``start`` and begins before ``end``: ``(begin, end)``."""
    gaps = [(b - a, a, b) for a, b in itertools.pairwise(times) if b > start and a < end]
    return max(gaps)[1:] if gaps else None


def time_back(
    bins: list[float], t0: float, bin_s: float, since: float, target: float, window_bins: int
) -> float | None:
    """Start of the first window of ``window_bins`` bins, from the bin holding ``since`` on,
    whose mean rate is >= ``target``."""
    first = max(0, int((since - t0) / bin_s))
    for i in range(first, len(bins) - window_bins + 1):
        if statistics.fmean(bins[i : i + window_bins]) >= target:
            return max(t0 + i * bin_s, since)
    return None


def first_event(events: list[dict], name: str, after: float, process: str, **match) -> dict | None:
    for ev in events:
        if (
            ev["event"] == name
            and ev["mono"] >= after
            and re.fullmatch(process, ev["process"])
            and all(ev.get(k) == v for k, v in match.items())
        ):
            return ev
    return None


@dataclass
class Timeline:
    """Seconds after the fault (``None``: not seen)."""

    detected: float | None = None
    view_committed: float | None = None
    survivors_resumed: float | None = None
    first_token: float | None = None
    process_up: float | None = None
    weights_loaded: float | None = None
    ready: float | None = None
    rejoined: float | None = None
    all_in_view: float | None = None
    throughput_95: float | None = None
    service_back: float | None = None  # end of the longest outage before the slot rejoined
    outage_s: float | None = None  # its length
    reintegration_gap_s: float | None = None  # longest gap around the rejoin
    weights: dict | None = None


PHASES = [
    ("detected (lease released)", "detected"),
    ("view without the slot committed", "view_committed"),
    ("survivors resumed (worker event)", "survivors_resumed"),
    ("first token after that view", "first_token"),
    ("process up (worker_started)", "process_up"),
    ("weights loaded", "weights_loaded"),
    ("ready", "ready"),
    ("rejoined (view with the slot)", "rejoined"),
    ("every slot in the view", "all_in_view"),
    ("service back (longest outage ends)", "service_back"),
    ("throughput >= 95% of pre-fault", "throughput_95"),
]
GAPS = [
    ("longest outage, all streams (s)", "outage_s"),
    ("longest gap around the rejoin (s)", "reintegration_gap_s"),
]


def build_timeline(run: dict, events: list[dict], views: list[tuple[float, object]]) -> Timeline:
    """``run``: kill (the first fault), slots and their old incarnations, token times, bins;
    ``views``: (mono, View). With several failed slots: detection and the view without them
    are the first, start-up phases and the rejoin the last (the instance is whole again)."""
    kill, n = run["kill"], run["num_slots"]
    slots, olds = run["slots"], run["old_incarnations"]
    tl = Timeline()

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - kill, 4)

    def newer(v) -> bool:  # every failed slot is back with a new incarnation
        return all((v.incarnation(s) or 0) > old for s, old in zip(slots, olds, strict=True))

    after = [(t, v) for t, v in views if t >= kill]
    removed = next((t for t, v in after if set(slots) - set(v.members)), None)
    back = next((t for t, v in after if newer(v)), None)
    full = next((t for t, v in after if len(v.members) == n and newer(v)), None)
    tl.view_committed, tl.rejoined, tl.all_in_view = rel(removed), rel(back), rel(full)
    detected = [
        ev["mono"]
        for s in slots
        if (ev := first_event(events, "lease_released", kill, f"supervisor{s}", slot=s))
    ]
    tl.detected = rel(min(detected)) if detected else tl.view_committed
    failed = "|".join(str(s) for s in slots)
    ev = first_event(events, "resumed", kill, rf"worker(?!(?:{failed})\.)\d+\.\d+")
    tl.survivors_resumed = rel(ev["mono"]) if ev else None
    if removed is not None:
        tl.first_token = rel(next((t for t in run["times"] if t > removed), None))

    def last(name: str, process: str) -> dict | None:
        found = [first_event(events, name, kill, process.format(s), slot=s) for s in slots]
        return None if None in found else max(found, key=lambda ev: ev["mono"])

    ev = last("worker_started", r"worker{}\.\d+")
    tl.process_up = rel(ev["mono"]) if ev else None
    ev = last("weights_loaded", r"worker{}\.\d+")
    if ev:
        tl.weights_loaded = rel(ev["mono"])
        tl.weights = {k: ev.get(k) for k in ("bytes", "seconds", "gbps", "sources", "from_disk")}
    ev = last("ready", "supervisor{}")
    tl.ready = rel(ev["mono"]) if ev else None
    outage = longest_gap(run["times"], kill, back if back is not None else float("inf"))
    since = outage[1] if outage else kill
    if outage:
        tl.service_back, tl.outage_s = rel(outage[1]), round(outage[1] - outage[0], 4)
    if back is not None:  # after the outage: the survivors' pause to admit the slot
        gap = longest_gap(run["times"], max(back - 1.0, since), back + 10.0)
        tl.reintegration_gap_s = round(gap[1] - gap[0], 4) if gap else None
    target = 0.95 * run["pre_rate"]
    window = max(1, round(run["window_s"] / run["bin_s"]))
    tl.throughput_95 = rel(time_back(run["bins"], run["t0"], run["bin_s"], since, target, window))
    return tl


def requeued_ids(frontend_log: str) -> set[str]:
    try:
        with open(frontend_log, errors="replace") as f:
            return set(re.findall(r"re-queueing (\S+) from slot", f.read()))
    except FileNotFoundError:
        return set()


def invariants(
    streams: list[Stream], expected: list[list[int]], max_tokens: int, kill: float, moved: set
) -> dict:
    done = [s for s in streams if s.error is None and len(s.tokens) == max_tokens]
    crossing = [s for s in streams if s.times and s.started < kill < s.times[-1]]
    survivors = [s for s in crossing if s.request_id not in moved]

    def gap(group: list[Stream]) -> float | None:
        gaps = [b - a for s in group for a, b in itertools.pairwise(s.times)]
        return round(max(gaps), 4) if gaps else None

    return {
        "requests": len(streams),
        "requests_lost": len(streams) - len(done),
        "outputs_differing": sum(s.tokens != expected[s.prompt_idx] for s in done),
        "requests_requeued": len(moved),
        "streams_across_fault": len(crossing),
        "survivor_streams": len(survivors),
        "longest_gap_survivors_s": gap(survivors),
        "longest_gap_any_s": gap(crossing),
        "errors": sorted({s.error for s in streams if s.error})[:5],
    }


# --- one run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    args.cuda_graphs = cuda_graphs(args)  # resolved, so the JSON says what ran
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes {args.modes!r}: name runs among {', '.join(MODES)}")
    if not all(0 <= s < args.slots for s in args.slot) or len(args.slot) >= args.slots:
        raise SystemExit(
            f"--slot {_slots_text(args.slot)} must name fewer than all of the {args.slots} slots"
        )
    import torch

    from eep.engine.reference import single_process_outputs
    from eep.engine.sampling import SamplingParams
    from eep.launcher import LaunchError

    from .launch import tiny_model

    model_path = os.path.abspath(args.model or tiny_model())
    dtype = args.dtype or ("float64" if args.device == "cpu" else "bfloat16")
    root = args.log_dir or tempfile.mkdtemp(prefix="eep-bench-recovery-")
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(3 + i % 6)] for i in range(args.prompts)]
    print(f"reference: {len(prompts)} prompts x {args.max_tokens} tokens, one process", flush=True)
    expected = single_process_outputs(
        model_path,
        prompts,
        [SamplingParams(max_tokens=args.max_tokens)] * len(prompts),
        getattr(torch, dtype),
        "cuda" if args.device == "cuda" else "cpu",
    )
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the reference held the whole model on GPU 0: give it back
    results, failed = {}, {}
    for mode in modes:
        print(
            f"\n== {mode}: {args.slots} slots, {args.clients} clients, {args.fault} slot "
            f"{_slots_text(args.slot)} at +{args.at:.0f} s; logs in {root}/{mode}",
            flush=True,
        )
        try:
            results[mode] = _run_mode(mode, args, model_path, dtype, prompts, expected, root)
        except (LaunchError, BenchError) as exc:
            print(f"eep bench recovery: {mode}: {exc}", flush=True)
            failed[mode] = str(exc)
            continue
        _write(args, results, failed, model_path, dtype, final=False)  # kept if a later run dies
    if not results:
        return 1
    _write(args, results, failed, model_path, dtype, final=True)
    return 1 if failed else 0


def _write(args, results: dict, failed: dict, model_path: str, dtype: str, final: bool) -> None:
    """The report of the runs done so far: printed (once, at the end), JSON and plot."""
    report = _report(args, results, model_path, dtype)
    report["failed"] = failed
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if final:
        _print_report(results, report["ratios"])
        for mode, why in failed.items():
            print(f"  {mode}: did not complete ({why})")
        print(f"\nwrote {args.out}")
    if args.plot:
        _plot(results, args.plot)


def _run_mode(mode, args, model_path, dtype, prompts, expected, root) -> dict:
    from eep.config import RuntimeConfig
    from eep.events import read_events
    from eep.launcher import Cluster, ClusterOptions
    from eep.model.config import ModelConfig

    num_experts = ModelConfig.from_dir(model_path).num_experts
    cfg = RuntimeConfig(
        cluster=f"bench-{mode[:4]}-{uuid.uuid4().hex[:6]}",
        model_path=model_path,
        num_slots=args.slots,
        experts_per_slot=-(-2 * num_experts // args.slots),
        device=args.device,
        dtype=dtype,
        ttl_s=args.ttl,
        fabric=_fabric(args.device, mode),
        exchange_timeout_s=exchange_timeout_s(args),
        cuda_graphs=args.cuda_graphs,
    )
    log_dir = os.path.join(root, mode)
    os.makedirs(log_dir, exist_ok=True)
    opts = ClusterOptions(cfg, log_dir=log_dir, baseline=mode == "baseline", max_restarts=3)
    started = time.monotonic()
    cluster = Cluster(opts).start(timeout_s=300)
    print(f"  up in {time.monotonic() - started:.1f} s at {cluster.url}", flush=True)
    victims: list[int] = []
    try:
        views: list[tuple[float, object]] = []
        cluster.watcher.on_view = lambda v: views.append((time.monotonic(), v))
        load = Load(cluster.url, prompts, args.clients, args.max_tokens).start()
        steady = load.wait_steady(args.warmup, timeout_s=180)
        time.sleep(max(0.0, steady + args.at - time.monotonic()))
        olds = [cluster.watcher.latest.incarnation(s) for s in args.slot]
        pids = [cluster.wait_worker_pid(s) for s in args.slot]
        kill = time.monotonic()
        for i, (slot, pid) in enumerate(zip(args.slot, pids, strict=True)):
            time.sleep(max(0.0, kill + i * args.stagger - time.monotonic()))
            try:
                os.kill(pid, signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP)
            except ProcessLookupError:  # the baseline tore every worker down with the first
                print(f"  worker pid {pid} of slot {slot} already exited", flush=True)
                continue
            victims.append(pid)
            print(f"  {args.fault} worker pid {pid} of slot {slot}", flush=True)
        stop_at = _await_recovery(cluster, load, args, steady, kill, olds)
        stuck = load.stop(timeout_s=120)
        end = time.monotonic()
        metrics = _metrics(cluster.url)
        wall_offset = time.time() - time.monotonic()
        committed = [(v.committed_at - wall_offset, v) for v in cluster.history()]
    finally:
        cluster.stop()
        for pid in victims:
            _reap(pid)
    times = load.token_times()
    bins = rates(times, load.started, end, args.bin)
    pre = [
        r
        for i, r in enumerate(bins)
        if steady <= load.started + i * args.bin and load.started + (i + 1) * args.bin <= kill
    ]
    run = {
        "mode": mode,
        "slots": list(args.slot),
        "stagger_s": args.stagger,
        "num_slots": args.slots,
        "old_incarnations": olds,
        "kill": kill,
        "t0": load.started,
        "times": times,
        "bins": bins,
        "bin_s": args.bin,
        "window_s": args.window,
        "pre_rate": statistics.median(pre) if pre else 0.0,
        "stopped_after_s": round(stop_at - kill, 2),
    }
    tl = build_timeline(run, read_events(log_dir), committed or views)
    moved = requeued_ids(os.path.join(log_dir, "frontend.log"))
    inv = invariants(load.streams, expected, args.max_tokens, kill, moved)
    inv["duplicate_tokens"] = metrics.get("eep_duplicate_tokens_total")
    inv["clients_stuck"] = stuck
    inv["views_after_fault"] = [
        {"epoch": v.epoch, "members": list(v.members), "at_s": round(t - kill, 3)}
        for t, v in committed
        if t >= kill
    ]
    return {**run, "timeline": asdict(tl), "invariants": inv, "log_dir": log_dir}


def _slot_list(text: str) -> tuple[int, ...]:
    try:
        slots = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: slots are integers, comma-separated") from None
    if len(set(slots)) != len(slots):
        raise argparse.ArgumentTypeError(f"{text!r} names a slot twice")
    return slots


def _slots_text(slots) -> str:
    return ",".join(str(s) for s in slots)


def _fabric(device: str, mode: str) -> str:
    """CPU: shm in both modes; GPU: the Triton kernels (symm), the baseline on NCCL."""
    if device == "cpu":
        return "shm"
    return "nccl" if mode == "baseline" else "symm"


def _await_recovery(cluster, load: Load, args, steady: float, kill: float, olds) -> float:
    """Until the failed slots are back in a full view and throughput is back, plus ``--tail``;
    at most ``--duration`` after the fault. Returns when the load was told to stop."""
    deadline = kill + args.duration
    recovered = None
    while time.monotonic() < deadline:
        time.sleep(0.25)
        if recovered is not None:
            if time.monotonic() >= recovered + args.tail:
                break
            continue
        view = cluster.watcher.latest
        if len(view.members) < args.slots or any(
            (view.incarnation(s) or 0) <= old for s, old in zip(args.slot, olds, strict=True)
        ):
            continue
        times = load.token_times()
        bins = rates(times, load.started, time.monotonic(), args.bin)
        pre = bins[int((steady - load.started) / args.bin) : int((kill - load.started) / args.bin)]
        outage = longest_gap(times, kill, float("inf"))
        window = max(1, round(args.window / args.bin))
        if (
            pre
            and outage
            and time_back(
                bins, load.started, args.bin, outage[1], 0.95 * statistics.median(pre), window
            )
        ):
            recovered = time.monotonic()
    else:
        print(f"  --duration {args.duration:.0f} s reached before full recovery", flush=True)
    return time.monotonic()


def _metrics(url: str) -> dict[str, float]:
    import requests

    try:
        return scrape_metrics(url, timeout_s=10)
    except requests.RequestException:
        return {}


def _reap(pid: int | None) -> None:
    """The failed worker, if still there (a stopped one the supervisor did not kill)."""
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"eep.rank.worker" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


# --- output --------------------------------------------------------------------------------


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ratio(ours, base) -> dict | None:
    if ours is None or base is None or ours <= 0 or base <= 0:
        return None
    return {"ours_s": ours, "baseline_s": base, "ours_over_baseline": round(ours / base, 4)}


def _ratio_text(r: dict) -> str:
    x = r["ours_over_baseline"]
    return f"{r['ours_s']:.2f} s vs {r['baseline_s']:.2f} s = {x:.3f}x ({1 / x:.1f}x shorter)"


RATIOS = (
    ("pause", "service_back"),
    ("time to 95%", "throughput_95"),
    ("time to rejoin", "all_in_view"),
)


def _report(args, results: dict, model_path: str, dtype: str) -> dict:
    ratios = {}
    if {"elastic", "baseline"} <= set(results):
        e, b = results["elastic"]["timeline"], results["baseline"]["timeline"]
        ratios = {name: _ratio(e[key], b[key]) for name, key in RATIOS}
    slim = {
        m: {**r, "times": [round(t - r["t0"], 4) for t in r["times"]]} for m, r in results.items()
    }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": model_path,
        "dtype": dtype,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "runs": slim,
        "ratios": ratios,
    }


def _print_report(results: dict, ratios: dict) -> None:
    modes = list(results)
    print("\nseconds after the fault")
    print(f"  {'phase':<38}" + "".join(f"{m:>12}" for m in modes))
    for label, key in PHASES:
        print(f"  {label:<38}" + "".join(f"{_fmt(results[m]['timeline'][key]):>12}" for m in modes))
    for label, key in GAPS:
        print(f"  {label:<38}" + "".join(f"{_fmt(results[m]['timeline'][key]):>12}" for m in modes))
    for m in modes:
        w = results[m]["timeline"]["weights"]
        if w:
            print(f"  weights of {m}: {w}")
    print(
        f"  {'pre-fault tokens/s (median bin)':<38}"
        + "".join(f"{results[m]['pre_rate']:>12.1f}" for m in modes)
    )
    print("\ninvariants")
    keys = [
        "requests",
        "requests_lost",
        "outputs_differing",
        "duplicate_tokens",
        "requests_requeued",
        "survivor_streams",
        "longest_gap_survivors_s",
        "longest_gap_any_s",
    ]
    for k in keys:
        print(f"  {k:<38}" + "".join(f"{str(results[m]['invariants'][k]):>12}" for m in modes))
    if ratios:
        print("\nratios, elastic / baseline (same machine, same load, one run)")
        for name, r in ratios.items():
            print(f"  {name:<16} {'-' if r is None else _ratio_text(r)}")


def _plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(
        len(results), 1, figsize=(11, 3.4 * len(results)), sharex=True, squeeze=False
    )
    marks = [
        ("view_committed", "view -slot", "tab:red"),
        ("first_token", "resumed", "tab:green"),
        ("service_back", "service back", "tab:olive"),
        ("process_up", "process up", "tab:purple"),
        ("ready", "ready", "tab:brown"),
        ("all_in_view", "rejoined", "tab:blue"),
        ("throughput_95", ">=95%", "black"),
    ]
    for ax, (mode, r) in zip(axes[:, 0], results.items(), strict=True):
        xs = [r["t0"] + i * r["bin_s"] - r["kill"] for i in range(len(r["bins"]))]
        ax.step(xs, r["bins"], where="post", color="tab:gray", label="tokens/s")
        ax.axhline(0.95 * r["pre_rate"], color="tab:orange", ls=":", label="95% pre-fault")
        ax.axvline(0, color="red", lw=2, label="fault")
        for key, label, color in marks:
            t = r["timeline"][key]
            if t is not None:
                ax.axvline(t, color=color, ls="--", lw=1, label=f"{label} {t:.1f} s")
        ax.set_title(f"{mode}: slot {_slots_text(r['slots'])} of {r['num_slots']}")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("tokens/s")
        ax.legend(loc="lower right", fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("seconds after the fault")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
