"""The report of ``eep bench chaos``: where it ran, per-case totals, the table."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time

from .chaos_checks import INVARIANTS

# Failure columns besides the invariants: runs whose fault missed the load, runs that broke.
FAILURES = ("missed", "errors")


def commit() -> dict:
    """The checkout's commit and whether its tree had changes (``None`` outside git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def header(args_dict: dict) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        **commit(),
        "machine": machine(),
        "args": args_dict,
    }


def _median_max(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def totals(runs: list[dict]) -> dict:
    """Per-case sums of every invariant and failure, faults landed, and timing spreads."""
    out: dict[str, dict] = {}
    for case in dict.fromkeys(r["case"] for r in runs):
        mine = [r for r in runs if r["case"] == case]
        timings = [t for r in mine for t in r["timings"]]
        out[case] = {
            "runs": len(mine),
            "faults_injected": sum(r["injected"] for r in mine),
            "faults_landed": sum(r["landed"] for r in mine),
            **{k: sum(r["invariants"].get(k, 0) for r in mine) for k in INVARIANTS},
            "missed": sum(r["missed"] is not None for r in mine),
            "errors": sum(r["error"] is not None for r in mine),
            "excluded_s": _median_max([t["excluded_s"] for t in timings if t["excluded_s"]]),
            "rejoined_s": _median_max([t["rejoined_s"] for t in timings if t["rejoined_s"]]),
        }
    return out


def failed(case_totals: dict) -> bool:
    """Any invariant or failure column non-zero, or any fault not landed."""
    return any(t[k] for t in case_totals.values() for k in (*INVARIANTS, *FAILURES)) or any(
        t["faults_landed"] != t["faults_injected"] for t in case_totals.values()
    )


def table(case_totals: dict) -> str:
    """One line per case: runs, faults landed, each invariant's sum, then kill->excluded and
    kill->rejoined seconds (median/max over the case's faults on live load)."""
    cols = (*INVARIANTS, *FAILURES)
    head = (
        f"{'case':<26}{'runs':>5}{'landed':>8}"
        + "".join(f"{c:>{len(c) + 2}}" for c in cols)
        + f"{'excluded s':>15}{'rejoined s':>15}"
    )
    lines = [head, "-" * len(head)]
    for case, t in case_totals.items():
        landed = f"{t['faults_landed']}/{t['faults_injected']}"
        lines.append(
            f"{case:<26}{t['runs']:>5}{landed:>8}"
            + "".join(f"{t[c]:>{len(c) + 2}}" for c in cols)
            + f"{_spread(t['excluded_s']):>15}{_spread(t['rejoined_s']):>15}"
        )
    lines.append("(excluded s / rejoined s: median/max from the kill to the view's commit)")
    return "\n".join(lines)


def _spread(mm: dict) -> str:
    if mm["median"] is None:
        return "-"
    return f"{mm['median']:.2f}/{mm['max']:.2f}"
