"""What a cluster's worker processes hold in memory: resident, proportional and GPU.

Read from ``/proc`` (``VmRSS`` in ``status``, ``Pss`` in ``smaps_rollup``: PSS splits shared
pages, the interpreter's and torch's libraries, between the processes that map them, so it
sums to what the host spends) and, where ``nvidia-smi`` answers, the GPU memory each process
holds (its CUDA context included). ``eep bench recovery`` records it per slot for the worker
and its warm standby, before the fault.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess

MB = 1e6


def _proc_kib(path: str, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def gpu_mib() -> dict[int, int]:
    """pid -> MiB of GPU memory, from ``nvidia-smi`` (``{}`` without one)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    used = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        try:
            used[int(pid)] = int(mib.strip().split()[0])
        except (ValueError, IndexError):
            continue
    return used


def process_memory(pid: int, gpu: dict[int, int] | None = None) -> dict:
    """``pid``'s RSS and PSS in MB, and its GPU MiB where known (``None`` for what cannot be
    read)."""
    rss = _proc_kib(f"/proc/{pid}/status", "VmRSS")
    pss = _proc_kib(f"/proc/{pid}/smaps_rollup", "Pss")
    return {
        "pid": pid,
        "rss_mb": None if rss is None else round(rss * 1024 / MB, 1),
        "pss_mb": None if pss is None else round(pss * 1024 / MB, 1),
        "gpu_mib": (gpu or {}).get(pid),
    }


def standby_pids(cluster_name: str) -> dict[int, int]:
    """slot -> pid of each live process started as a standby of ``cluster_name`` (a promoted
    one keeps its command line: call this before any promotion)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"eep.rank.worker" not in argv or len(argv) < 4:
            continue
        try:
            args = json.loads(argv[argv.index(b"eep.rank.worker") + 1])
        except (ValueError, IndexError):
            continue
        if args.get("standby") and args.get("cluster") == cluster_name:
            found[int(args["slot"])] = int(entry)
    return found


def cluster_memory(cluster) -> list[dict]:
    """Per slot, the worker's and the standby's :func:`process_memory` (standby ``None``
    where the slot has none)."""
    gpu = gpu_mib()
    standbys = standby_pids(cluster.cfg.cluster)
    rows = []
    for slot in range(cluster.cfg.num_slots):
        standby = standbys.get(slot)
        rows.append(
            {
                "slot": slot,
                "worker": process_memory(cluster.wait_worker_pid(slot), gpu),
                "standby": None if standby is None else process_memory(standby, gpu),
            }
        )
    return rows


def describe_memory(rows: list[dict]) -> str:
    """One line: the median worker's and standby's PSS (and GPU MiB where known)."""

    def median(values: list) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    parts = []
    for role in ("worker", "standby"):
        procs = [r[role] for r in rows if r[role] is not None]
        if not procs:
            continue
        pss, gpu = median([p["pss_mb"] for p in procs]), median([p["gpu_mib"] for p in procs])
        part = f"{role} PSS {pss:.0f} MB" if pss is not None else f"{role} PSS ?"
        parts.append(part + (f", GPU {gpu} MiB" if gpu is not None else ""))
    return "memory per slot (median): " + "; ".join(parts)
