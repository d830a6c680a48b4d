"""The recovery bench's report: provenance, the table (median and max over repeated runs per
mode, elastic / baseline ratios), the JSON that keeps every run, and the plot."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

from .recovery_timeline import summarize

# (label, figure): the table's rows, in order; figures are read by :func:`figures`
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
    ("service back (merged outage ends)", "service_back"),
    ("served >= 95% of pre-fault, sustained", "throughput_95"),
]
STALLS = [
    ("worst stall, one stream in flight at the fault (s)", "worst_stream_stall_s"),
    ("  the same among streams not re-queued (s)", "worst_survivor_stall_s"),
    ("worst wait, one stream alive fault->rejoin (s)", "worst_wait_s"),
    ("longest outage, all streams merged (s)", "outage_s"),
    ("longest gap around the rejoin, merged (s)", "reintegration_gap_s"),
]
THROUGHPUT = [
    ("capacity measured (tokens/s)", "capacity_tps"),
    ("offered (tokens/s)", "offered_tps"),
    ("served before the fault (tokens/s)", "pre_rate"),
    ("served fault->rejoin, mean (x pre-fault)", "outage_mean_frac"),
    ("served fault->rejoin, lowest bin (x pre)", "outage_min_frac"),
    ("survivors' tokens/s fault->rejoin (x theirs pre)", "survivors_frac"),
    ("tokens served fault->rejoin", "tokens_during"),
]
LATENCY = [
    (f"{metric.upper()} p{q} {phase} (s)", f"{metric}_p{q}_{phase}")
    for phase in ("before", "during", "after")
    for metric in ("ttft", "tpot")
    for q in (50, 99)
]
SECTIONS = [
    ("seconds after the fault", PHASES),
    ("stalls", STALLS),
    ("throughput", THROUGHPUT),
    ("latency by arrival: before the fault / fault->rejoin (or in flight at it) / after", LATENCY),
]
INVARIANTS = [
    "requests",
    "requests_lost",
    "outputs_differing",
    "duplicate_tokens",
    "stale_accepted",
    "requests_requeued",
]
# elastic / baseline of the medians
RATIOS = [
    ("worst stream stall", "worst_stream_stall_s"),
    ("merged outage", "outage_s"),
    ("time to 95%", "throughput_95"),
    ("time to rejoin", "all_in_view"),
    ("TTFT p99 during", "ttft_p99_during"),
]


def figures(run: dict) -> dict[str, float | None]:
    """Every figure of one run by name (the rows of the table)."""
    tl = run["timeline"]
    out = {key: tl[key] for _, key in PHASES}
    out["outage_s"], out["reintegration_gap_s"] = tl["outage_s"], tl["reintegration_gap_s"]
    out["worst_stream_stall_s"] = (run["stall"] or {}).get("stall_s")
    out["worst_survivor_stall_s"] = (run["survivor_stall"] or {}).get("stall_s")
    out["worst_wait_s"] = (run.get("outage_wait") or {}).get("stall_s")
    spec = run["load"]["spec"]
    out["capacity_tps"] = (run["capacity"] or {}).get("tokens_per_s")
    out["offered_tps"] = spec["rate"] * spec["max_tokens"] if spec["rate"] else None
    out["pre_rate"] = run["pre_rate"]
    out["outage_mean_frac"] = run["dip"]["outage_mean_frac"]
    out["outage_min_frac"] = run["dip"]["outage_min_frac"]
    out["survivors_frac"] = run["dip"].get("survivors_frac")
    out["tokens_during"] = run["faults"][0]["tokens_during"]
    for phase, lat in run["latency"].items():
        for key, value in lat.items():
            if key.endswith("_s"):
                out[f"{key[:-2]}_{phase}"] = value
    return out


def summary(runs: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """Per mode and figure: median, max and how many runs had it."""
    out = {}
    for mode, done in runs.items():
        per_run = [figures(r) for r in done]
        names = per_run[0].keys() if per_run else []
        out[mode] = {k: summarize([f[k] for f in per_run]) for k in names}
    return out


def ratios(summ: dict, ours_mode: str = "elastic", base_mode: str = "baseline") -> dict:
    """``ours_mode`` / ``base_mode`` per figure of :data:`RATIOS` (medians); ``{}`` unless
    both modes ran."""
    if not all(summ.get(m) for m in (ours_mode, base_mode)):
        return {}
    out = {}
    for name, key in RATIOS:
        ours, base = summ[ours_mode][key]["median"], summ[base_mode][key]["median"]
        ok = ours is not None and base is not None and ours > 0 and base > 0
        out[name] = (
            {ours_mode: ours, base_mode: base, "ratio": round(ours / base, 4)} if ok else None
        )
    return out


def provenance() -> dict:
    """The commit (and whether the tree differs from it), the machine and the date."""
    import torch

    def git(*args: str) -> str | None:
        try:  # --no-optional-locks: no index refresh, which could race a commit being made
            cmd = ["git", "--no-optional-locks", *args]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    # untracked files count: a new module that is not committed yet is code that ran
    changed = None if (status := git("status", "--porcelain")) is None else status.splitlines()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": (git("rev-parse", "HEAD") or "").strip() or None,
        "dirty": None if changed is None else bool(changed),
        "dirty_paths": None if changed is None else [line[3:] for line in changed[:20]],
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
    }


def report(prov: dict, args: dict, resolved: dict, runs: dict, failed: list) -> dict:
    summ = summary(runs)
    return {
        **prov,
        "args": args,
        "resolved": resolved,
        "summary": summ,
        "ratios": ratios(summ),
        "ratios_warm_cold": ratios(summ, "elastic", "elastic-cold"),
        "runs": runs,
        "failed": failed,
    }


def _cell(s: dict) -> str:
    def f(v) -> str:
        if v is None:
            return "-"
        return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3f}"

    return f"{f(s['median']):>9}{f(s['max']):>9}"


def table(rep: dict) -> str:
    """The printed report: per mode, the median and max of each figure over its runs."""
    summ, runs = rep["summary"], rep["runs"]
    modes = [m for m in summ if runs.get(m)]
    head = "".join(f"{m + f' ({len(runs[m])} runs)':>18}" for m in modes)
    sub = "".join(f"{'median':>9}{'max':>9}" for _ in modes)
    lines = [f"  {'':<52}{head}", f"  {'':<52}{sub}"]
    for title, rows in SECTIONS:
        lines.append(f"{title}")
        for label, key in rows:
            lines.append(f"  {label:<52}" + "".join(_cell(summ[m][key]) for m in modes))
    lines.append("invariants (sum over runs)")
    for key in INVARIANTS:
        cells = []
        for m in modes:
            vals = [r["invariants"].get(key) for r in runs[m]]
            cells.append(f"{'-' if None in vals else f'{sum(vals):g}':>18}")
        lines.append(f"  {key:<52}" + "".join(cells))
    for key, base in (("ratios", "baseline"), ("ratios_warm_cold", "elastic-cold")):
        if not rep.get(key):
            continue
        lines.append(f"ratios, elastic / {base} (medians; same machine, runs interleaved)")
        for name, r in rep[key].items():
            text = (
                "-"
                if r is None
                else (
                    f"{r['elastic']:.3f} s vs {r[base]:.3f} s = {r['ratio']:.3f}x "
                    f"({1 / r['ratio']:.1f}x shorter)"
                )
            )
            lines.append(f"  {name:<20} {text}")
    for fail in rep["failed"]:
        lines.append(f"  {fail['mode']} run {fail['repeat']}: did not complete ({fail['error']})")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], resolved: dict, path: str) -> str | None:
    """Per mode, two panels on one time axis: served tokens/s in total (the first run in black,
    the other runs in grey, the offered load, 95% of pre-fault and the phases), then per slot
    (the first run). Returns why not, if it could not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    modes = [m for m in runs if runs[m]]
    fig, axes = plt.subplots(
        2 * len(modes), 1, figsize=(12, 5.2 * len(modes)), squeeze=False, sharex=True
    )
    for k, mode in enumerate(modes):
        _total_panel(axes[2 * k, 0], mode, runs[mode], resolved)
        _slot_panel(axes[2 * k + 1, 0], mode, runs[mode][0])
    axes[-1, 0].set_xlabel("seconds after the fault")
    axes[-1, 0].set_xlim(-resolved["at_s"] - 2, None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


MARKS = [
    ("view_committed", "view -slot", "tab:red"),
    ("process_up", "process up", "tab:purple"),
    ("ready", "ready", "tab:brown"),
    ("all_in_view", "rejoined", "tab:blue"),
    ("throughput_95", ">=95%", "black"),
]


def _xs(curve: dict) -> list[float]:
    return [curve["x0_s"] + i * curve["bin_s"] for i in range(len(curve["total"]))]


def _marks(ax, run: dict, labels: bool) -> None:
    ax.axvline(0, color="red", lw=2, label="fault" if labels else None)
    for key, label, color in MARKS:
        t = run["timeline"][key]
        if t is not None:
            text = f"{label} {t:.1f} s" if labels else None
            ax.axvline(t, color=color, ls="--", lw=1, label=text)


def _total_panel(ax, mode: str, done: list[dict], resolved: dict) -> None:
    for r in done[1:]:
        ax.step(_xs(r["curve"]), r["curve"]["total"], where="post", color="0.75", lw=0.8)
    r = done[0]
    ax.step(
        _xs(r["curve"]),
        r["curve"]["total"],
        where="post",
        color="black",
        lw=1.4,
        label="served (client token times)",
    )
    spec = r["load"]["spec"]
    if spec["rate"]:
        ax.axhline(spec["rate"] * spec["max_tokens"], color="tab:green", ls="-.", label="offered")
    ax.axhline(0.95 * r["pre_rate"], color="tab:orange", ls=":", label="95% pre-fault")
    _marks(ax, r, labels=True)
    slots = ",".join(str(f["slot"]) for f in r["faults"])
    ax.set_title(
        f"{mode}: slot {slots} of {resolved['num_slots']} fails; {r['load']['described']}; "
        f"run 1 of {len(done)} in black, the others in grey",
        fontsize=9,
    )
    ax.set_ylim(bottom=0)
    ax.set_ylabel("tokens/s, total")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)


def _slot_panel(ax, mode: str, r: dict) -> None:
    x = _xs(r["curve"])
    for slot, ys in sorted(r["curve"]["per_slot"].items(), key=lambda kv: int(kv[0])):
        ys = [float("nan") if y is None else y for y in ys]
        ax.step(x, ys, where="post", lw=1.0, label=f"slot {slot}")
    _marks(ax, r, labels=False)
    title = f"{mode}, run 1: tokens/s per slot (front-end counters, polled per bin)"
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("tokens/s, per slot")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
