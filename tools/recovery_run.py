"""One run of the recovery bench: a cluster, its capacity, a load, a fault proven to land.

The run starts a cluster (``elastic``: one torchrun agent per slot; ``baseline``: one torchrun
over every slot, so a failure restarts them all), measures what it serves saturated (open
loop only), offers the load, injects the fault into live load with :mod:`eep.tools.faults`,
waits for the view without the slot, its re-queue and its rejoin, proves the fault landed,
and keeps the load on until throughput is back plus ``tail_s``. Meanwhile a poller reads the
front-end's per-slot token counters once per bin. The run's record is analysed by
:mod:`eep.tools.recovery_timeline`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from dataclasses import asdict

from . import faults
from .common import new_cluster_name
from .loadgen import Load, LoadSpec, measure_capacity
from .proc_memory import cluster_memory, describe_memory
from .recovery_settings import BenchSettings
from .recovery_timeline import (
    Curve,
    Outage,
    build_timeline,
    dip,
    latency_phases,
    pre_fault_rate,
    rates,
    slot_rates,
    time_back,
    view_marks,
    worst_stall,
)

log = logging.getLogger(__name__)


class BenchError(RuntimeError):
    """The run could not be done; the message says what to change."""


class SlotPoller:
    """Reads ``/debug/slots`` every ``interval_s`` on a thread: ``(mono, {slot: tokens})``."""

    def __init__(self, url: str, interval_s: float):
        self.url, self.interval_s = url, interval_s
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.misses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slot-poller", daemon=True)

    def start(self) -> SlotPoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        import requests

        while not self._stop.is_set():
            asked = time.monotonic()
            try:
                state = faults.slots_state(self.url, timeout_s=self.interval_s * 4)
            except (requests.RequestException, ValueError, KeyError):
                self.misses += 1  # a busy front-end: the bin is interpolated over
            else:
                # stamp at the midpoint: the counters were read somewhere within the request
                stamp = (asked + time.monotonic()) / 2
                self.samples.append((stamp, {s: v["tokens"] for s, v in state["slots"].items()}))
            self._stop.wait(max(0.0, asked + self.interval_s - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s * 8)


def run_once(s: BenchSettings, mode: str, log_dir: str, prompts, expected, say) -> dict:
    """One cluster, one fault; returns the run's record with its analysis. ``say`` prints a
    progress line. Raises :class:`BenchError`, ``LaunchError``, ``FaultMissed`` or
    ``LoadError`` when the run proves nothing."""
    from eep.launcher import Cluster, ClusterOptions

    os.makedirs(log_dir, exist_ok=True)
    opts = ClusterOptions(
        _runtime(s, mode),
        log_dir=log_dir,
        baseline=mode == "baseline",
        standby=mode == "elastic",
    )
    started = time.monotonic()
    cluster = Cluster(opts).start(timeout_s=300)
    say(f"up in {time.monotonic() - started:.1f} s at {cluster.url}")
    injected: list[faults.Fault] = []
    try:
        if mode == "elastic":
            faults.wait_standbys(cluster)
            say(f"standbys warm at {time.monotonic() - started:.1f} s")
        memory = cluster_memory(cluster)
        say(describe_memory(memory))
        views: list[tuple[float, object]] = []
        cluster.watcher.on_view = lambda v: views.append((time.monotonic(), v))
        spec, capacity = _offer(s, cluster.url, prompts, say)
        poller = SlotPoller(cluster.url, s.bin_s).start()
        load = Load(cluster.url, prompts, spec).start()
        try:
            time.sleep(s.warmup_s)
            steady = time.monotonic()
            _check_load(load, steady)
            time.sleep(s.at_s)
            injected = _inject(s, cluster, say)
            _await_outage(s, mode, cluster, load, injected)
            say(
                f"rejoined +{injected[-1].rejoined_at - injected[0].at:.2f} s; "
                f"{sum(f.requeued for f in injected)} re-queued, "
                f"{injected[0].tokens_during} tokens during the outage"
            )
            _await_recovery(s, load, steady, injected[0].at, say)
        finally:
            end = time.monotonic()
            stuck = load.stop(timeout_s=120)
            poller.stop()
        metrics = _metrics(cluster.url)
        wall_offset = time.time() - time.monotonic()
        committed = [(v.committed_at - wall_offset, v) for v in cluster.history()]
    finally:
        cluster.stop()
        for f in injected:
            _reap(f.pid)
    from eep.events import read_events

    record = {
        "mode": mode,
        "log_dir": log_dir,
        "capacity": capacity,
        "load": {"spec": asdict(spec), "described": spec.describe()},
        "faults": [f.to_dict() for f in injected],
        "poller_misses": poller.misses,
        "memory": memory,
    }
    record |= analyse(
        s, load, poller.samples, steady, end, injected, read_events(log_dir), committed or views
    )
    offered = spec.rate * spec.max_tokens if spec.rate else None
    if offered and record["pre_rate"] < 0.9 * offered:
        say(
            f"note: {record['pre_rate']:.0f} tokens/s served before the fault, below the "
            f"{offered:.0f} offered: the cluster fell behind (a busy machine?)"
        )
    moved = requeued_ids(os.path.join(log_dir, "frontend.log"))
    record["invariants"] = invariants(load.snapshot(), expected, s.max_tokens, moved)
    record["invariants"] |= {
        "duplicate_tokens": metrics.get("eep_duplicate_tokens_total"),
        "stale_accepted": metrics.get("eep_stale_accepted_total"),
        "requests_stuck": stuck,
    }
    record["stall"] = worst_stall(load.snapshot(), injected[0].at, moved)
    survivors = [st for st in load.snapshot() if st.request_id not in moved]
    record["survivor_stall"] = worst_stall(survivors, injected[0].at, moved)
    rejoin = max(f.rejoined_at for f in injected)
    record["outage_wait"] = worst_stall(load.snapshot(), injected[0].at, moved, until=rejoin)
    return record


def _runtime(s: BenchSettings, mode: str):
    """The cluster of one run: the bench's resolved settings, the fabric of ``mode``."""
    from eep.config import RuntimeConfig
    from eep.model.config import ModelConfig

    return RuntimeConfig.for_cluster(
        new_cluster_name(f"bench-{mode[:4]}"),
        s.model_path,
        s.num_slots,
        num_experts=ModelConfig.from_dir(s.model_path).num_experts,
        device=s.device,
        dtype=s.dtype,
        fabric=s.fabric(mode),
        baseline=mode == "baseline",
        ttl_s=s.ttl_s,
        exchange_timeout_s=s.exchange_timeout_s,
        cuda_graphs=s.cuda_graphs,
        standby_stage=s.standby_stage,
        max_num_seqs=s.max_num_seqs,
    )


def _offer(s: BenchSettings, url: str, prompts, say) -> tuple[LoadSpec, dict | None]:
    """The load to offer: closed loop as given; open loop at ``load_factor`` of the capacity
    measured here (saturating closed loop), or at ``rate`` when one is given."""
    if s.load == "closed":
        return LoadSpec(max_tokens=s.max_tokens, streams=s.streams), None
    capacity = None
    rate = s.rate
    if rate is None:
        capacity = measure_capacity(
            url, prompts, s.max_tokens, s.capacity_streams, s.capacity_s, s.capacity_warmup_s
        )
        rate = s.load_factor * capacity["tokens_per_s"] / s.max_tokens
        say(
            f"capacity {capacity['tokens_per_s']:.0f} tokens/s ({s.capacity_streams} streams); "
            f"offering {rate:.2f} requests/s = {rate * s.max_tokens:.0f} tokens/s "
            f"({s.load_factor:g}x)"
        )
    # an outage of the full restart queues every arrival: give each its own client thread
    spec = LoadSpec(max_tokens=s.max_tokens, rate=rate, max_outstanding=1024)
    return spec, capacity


def _check_load(load: Load, steady: float) -> None:
    errors = [st.error for st in load.snapshot() if st.error]
    if errors:
        raise BenchError(f"{len(errors)} requests failed before the fault: {errors[0]}")
    if load.tokens_between(load.started, steady) == 0:
        raise BenchError("no token was served during the warm-up: read the cluster's logs")


def _inject(s: BenchSettings, cluster, say) -> list[faults.Fault]:
    """Each failed slot's worker, ``stagger_s`` apart, each only once it streams. In the
    baseline the first fault tears every slot down, so a later slot may have nothing left to
    fail: it is skipped (and said so), not counted as a miss."""
    sig = signal.SIGKILL if s.fault == "kill" else signal.SIGSTOP
    injected: list[faults.Fault] = []
    for i, slot in enumerate(s.failed_slots):
        if injected:
            time.sleep(max(0.0, injected[0].at + i * s.stagger_s - time.monotonic()))
            if not faults.slots_state(cluster.url)["slots"][slot]["live"]:
                say(f"slot {slot} is already down (torn down with the first): not injected")
                continue
        fault = faults.inject(cluster, slot, "worker", sig, timeout_s=60)
        say(f"{s.fault} worker pid {fault.pid} of slot {slot} ({fault.emitting} streaming on it)")
        injected.append(fault)
    return injected


def _await_outage(s: BenchSettings, mode: str, cluster, load: Load, injected) -> None:
    """The view without each slot, its requests re-queued, every slot back; then the proof.
    The full restart serves nothing between fault and rejoin by design, so only the elastic
    run must show tokens delivered meanwhile."""
    for fault in injected:
        faults.wait_excluded(cluster, fault, timeout_s=s.duration_s)
    for fault in injected:
        faults.wait_requeued(cluster.url, fault, timeout_s=s.duration_s)
    for fault in injected:
        faults.wait_rejoined(cluster, fault, timeout_s=s.duration_s)
    for fault in injected:
        faults.prove(fault, load if mode != "baseline" else None, cluster.url)
        fault.tokens_during = load.tokens_between(fault.at, fault.rejoined_at)


def _await_recovery(s: BenchSettings, load: Load, steady: float, fault_at: float, say) -> None:
    """Until the served curve is back to >= 95% of its pre-fault rate over ``window_s`` (at
    most ``duration_s`` after the fault), then ``tail_s`` more."""
    window = max(1, round(s.window_s / s.bin_s))
    while time.monotonic() < fault_at + s.duration_s:
        now = time.monotonic()
        curve = Curve(load.started, s.bin_s, rates(load.token_times(), load.started, now, s.bin_s))
        if time_back(curve, fault_at, 0.95 * pre_fault_rate(curve, steady, fault_at), window):
            break
        time.sleep(s.bin_s)
    else:
        say(f"--duration {s.duration_s:.0f} s reached before throughput was back")
    time.sleep(s.tail_s)


def analyse(s: BenchSettings, load, samples, steady, end, injected, events, views) -> dict:
    """The run's figures (see :mod:`eep.tools.recovery_timeline`); times relative to the
    first fault."""
    fault_at = injected[0].at
    outage = Outage(
        fault_at,
        tuple(f.slot for f in injected),
        tuple(f.old_incarnation for f in injected),
        s.num_slots,
    )
    times = load.token_times()
    total = rates(times, load.started, end, s.bin_s)
    curve = Curve(
        load.started, s.bin_s, total, slot_rates(samples, load.started, s.bin_s, len(total))
    )
    pre_rate = pre_fault_rate(curve, steady, fault_at)
    tl = build_timeline(outage, times, curve, pre_rate, s.window_s, events, views)
    whole = view_marks(outage, views)["whole"]
    views_after = [
        {"epoch": v.epoch, "members": list(v.members), "at_s": round(t - fault_at, 3)}
        for t, v in views
        if t >= fault_at
    ]
    return {
        "fault_at_s": round(fault_at - load.started, 4),  # after the load started
        "steady_at_s": round(steady - load.started, 4),
        "pre_rate": round(pre_rate, 2),
        "timeline": asdict(tl),
        "dip": dip(curve, (steady, fault_at), outage, whole),
        "latency": latency_phases(load.snapshot(), fault_at, whole, steady),
        "views_after_fault": views_after,
        "curve": {
            "x0_s": round(load.started - fault_at, 4),  # the first bin's start, after the fault
            "bin_s": s.bin_s,
            "total": [round(r, 2) for r in curve.total],
            "per_slot": {
                str(k): [None if r is None else round(r, 2) for r in v]
                for k, v in curve.per_slot.items()
            },
        },
    }


def requeued_ids(frontend_log: str) -> set[str]:
    """Request ids the front-end re-queued off a slot (its log says so for each)."""
    try:
        with open(frontend_log, errors="replace") as f:
            return set(re.findall(r"re-queueing (\S+) from slot", f.read()))
    except FileNotFoundError:
        return set()


def invariants(streams: list, expected: list[list[int]], max_tokens: int, moved: set) -> dict:
    done = [st for st in streams if st.error is None and len(st.tokens) == max_tokens]
    return {
        "requests": len(streams),
        "requests_lost": len(streams) - len(done),
        "outputs_differing": sum(st.tokens != expected[st.prompt_idx] for st in done),
        "requests_requeued": len(moved),
        "errors": sorted({st.error for st in streams if st.error})[:5],
    }


def _metrics(url: str) -> dict[str, float]:
    import requests

    from .common import scrape_metrics

    try:
        return scrape_metrics(url, timeout_s=10)
    except requests.RequestException as exc:
        log.warning("no /metrics after the run (%s): duplicates are not counted", exc)
        return {}


def _reap(pid: int) -> None:
    """The failed worker, if still there (a stopped one the supervisor did not kill)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"eep.rank.worker" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass
