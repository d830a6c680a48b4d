"""``eep bench placement``: the coordinator's placement planner at EP32-EP256, simulated.

No ranks run: each trial takes the home placement the launcher would build
(``initial_placement(experts, slots, experts_per_slot)``, uniform load), kills slots, and asks
the coordinator's own planner (``eep.planner.next_placement``) for the next view's placement,
then for the placement once every dead slot is back. Per trial it counts:
- orphans at failure: logical experts none of whose replicas is on a live slot (their new
  copies can only come from the checkpoint: the project keeps no host-memory copy);
- orphans after repair: experts the repaired placement still leaves uncovered (capacity ran
  out: the view is degraded and every rank pauses until a slot returns);
- copies moved: live positions whose expert the repair changed (the minimum a rank must pull),
  and the as-built figure: a live slot whose experts change rebuilds its whole expert arena
  (design.md 8, "Placement changes on a serving rank"), so it pulls every one of its experts;
- the same two for the restore (every dead slot back: the returning slots pull all of theirs);
- the planner's wall time per call (decode of the previous view's placement included).

Slots sit on hosts of ``--slots-per-host`` consecutive slots (slot s on host s // 8, as
torchrun numbers local ranks). Failure modes: ``random`` (k distinct slots, uniformly),
``host`` (every slot of h distinct hosts) and ``host-strided``, a what-if: the same planner
with slots numbered across hosts (slot s on host s % H, H hosts), so that the planner's
neighbouring slots land on different hosts. The same failed set is used for every redundancy
level of one EP size, trial and k, so levels compare on identical faults.

Redundancy levels (``--redundancy``): an integer x gives ``experts_per_slot = ceil(E / S) + x``
(x spare positions per slot: S * x redundant physical experts); ``2x`` is the launcher's
default, ``two_replica_experts_per_slot`` (room for two replicas of every expert).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

from eep.membership.view import View
from eep.placement import Placement, initial_placement, two_replica_experts_per_slot
from eep.planner import next_placement

# routed-expert shapes; bytes of one logical expert = moe_layers * 3 * hidden * inter * dtype
MODELS = {
    "deepseek-v3": {
        "experts": 256,
        "hidden": 7168,
        "moe_intermediate": 2048,
        "moe_layers": 58,
        "note": "DeepSeek-V3 config.json: hidden_size 7168, moe_intermediate_size 2048, 61 "
        "layers of which the first 3 dense (first_k_dense_replace), n_routed_experts 256",
    },
    "qwen3-30b-a3b": {
        "experts": 128,
        "hidden": 2048,
        "moe_intermediate": 768,
        "moe_layers": 48,
        "note": "Qwen3-30B-A3B config.json: hidden_size 2048, moe_intermediate_size 768, 48 "
        "layers all MoE, num_experts 128",
    },
}
DEFAULT_OUT = "docs/results/2026-12-06-placement-sim.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--ep", default="32,64,128,256", help="EP sizes in slots, comma-separated (32,64,128,256)")
    p("--slots-per-host", type=int, default=8, help="slots per host (8): host of slot s = s // 8")
    p("--model", choices=sorted(MODELS), default="deepseek-v3", help="expert shapes (deepseek-v3)")
    p("--experts", type=int, default=None, help="routed experts (default: the model's, 256)")
    p("--dtype-bytes", type=int, default=2, help="bytes per weight (2: bf16; 1: fp8)")
    p(
        "--redundancy",
        default="0,1,2,2x",
        help="levels: an integer x = x spare experts per slot over ceil(E/S); '2x' = room for "
        "two replicas of every expert, the launcher's default (0,1,2,2x)",
    )
    p("--failures", default="1-16", help="random slot failures per trial: 'a-b' or a list (1-16)")
    p("--host-failures", default="1,2", help="whole hosts failed per trial (1,2; '' for none)")
    p("--seeds", type=int, default=20, help="trials (seeds 0..N-1) per case (20)")
    p("--quick", action="store_true", help="tiny run: EP 32,64; failures 1,2,4; 1 host; 3 seeds")
    p("--out", default=DEFAULT_OUT, help=f"JSON results ({DEFAULT_OUT})")
    p("--plot", default=None, help="PNG (default: --out with .png; '' for none)")


def _ints(text: str) -> list[int]:
    out: list[int] = []
    for part in (t.strip() for t in text.split(",") if t.strip()):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def resolve(args: argparse.Namespace) -> dict:
    """The run's parameters, checked; ``--quick`` overrides the sizes."""
    model = MODELS[args.model]
    experts = args.experts or model["experts"]
    r = {
        "ep": _ints(args.ep),
        "slots_per_host": args.slots_per_host,
        "model": args.model,
        "experts": experts,
        "redundancy": [t.strip() for t in args.redundancy.split(",") if t.strip()],
        "failures": _ints(args.failures),
        "host_failures": _ints(args.host_failures),
        "seeds": args.seeds,
    }
    if args.quick:
        r.update(ep=[32, 64], failures=[1, 2, 4], host_failures=[1], seeds=3)
    per_layer = 3 * model["hidden"] * model["moe_intermediate"] * args.dtype_bytes
    r["expert_bytes"] = per_layer * model["moe_layers"]
    r["expert_bytes_per_layer"] = per_layer
    r["shapes"] = {k: model[k] for k in ("hidden", "moe_intermediate", "moe_layers", "note")}
    r["dtype_bytes"] = args.dtype_bytes
    bad = [x for x in r["redundancy"] if x != "2x" and not (x.isdigit())]
    if bad or not r["redundancy"]:
        raise SystemExit(f"eep bench placement: bad --redundancy {bad}; see --help")
    if experts < 1 or r["seeds"] < 1 or r["slots_per_host"] < 1 or not r["ep"]:
        raise SystemExit("eep bench placement: --experts, --seeds, --slots-per-host must be >= 1")
    for s in r["ep"]:
        if s % r["slots_per_host"] or max(r["failures"], default=0) >= s:
            raise SystemExit(f"eep bench placement: EP {s} must be whole hosts, > any failure")
        if max(r["host_failures"], default=0) >= s // r["slots_per_host"]:
            raise SystemExit(f"eep bench placement: EP {s} has too few hosts for the failures")
    return r


def experts_per_slot(level: str, experts: int, slots: int) -> int:
    if level == "2x":
        return two_replica_experts_per_slot(experts, slots)
    return -(-experts // slots) + int(level)


def _planned(home: Placement, members: list[int], previous: View) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    payload = next_placement(home, members, previous)
    return payload["phy2log"], time.perf_counter() - t0


def trial(home: Placement, view1: View, dead: set[int]) -> dict:
    """One failure of ``dead`` from the home view, its repair and the restore to all slots."""
    eps, slots, experts = home.experts_per_slot, home.num_slots, home.num_experts
    before = home.phy2log
    live = [s for s in range(slots) if s not in dead]
    covered = {e for p, e in enumerate(before) if e >= 0 and p // eps not in dead}
    orphans_at_failure = set(range(experts)) - covered
    after, t_repair = _planned(home, live, view1)
    moved = [p for p in range(len(after)) if after[p] >= 0 and after[p] != before[p]]
    assert all(p // eps not in dead for p in moved), "the repair placed experts on dead slots"
    per_slot: dict[int, int] = {}
    for p in moved:
        per_slot[p // eps] = per_slot.get(p // eps, 0) + 1
    view2 = View(epoch=2, members=tuple(live), placement=_payload(home, after, live))
    back, t_restore = _planned(home, list(range(slots)), view2)
    restored = [
        p for p in range(len(back)) if back[p] >= 0 and (p // eps in dead or back[p] != after[p])
    ]
    return {
        "orphans_at_failure": len(orphans_at_failure),
        "orphans_after_repair": experts - len({e for e in after if e >= 0}),
        "copies": len(moved),
        "copies_from_checkpoint": sum(1 for p in moved if after[p] in orphans_at_failure),
        "copies_as_built": len(per_slot) * eps,
        "max_copies_one_slot": max(per_slot.values(), default=0),
        "restore_copies": len(restored),
        "restore_copies_as_built": len({p // eps for p in restored}) * eps,
        "restored_home": back == list(home.home),
        "repair_s": t_repair,
        "restore_s": t_restore,
    }


def _payload(home: Placement, phy2log: list[int], live: list[int]) -> dict:
    payload = home.to_json()
    payload.update(phy2log=phy2log, live=live)
    return payload


def failed_sets(r: dict, slots: int) -> list[tuple[str, int, int, set[int]]]:
    """``(mode, k slots, hosts, dead)`` for every case and seed of one EP size."""
    sph, out = r["slots_per_host"], []
    for k in r["failures"]:
        for seed in range(r["seeds"]):
            rng = random.Random(f"random-{slots}-{k}-{seed}")
            out.append(("random", k, 0, set(rng.sample(range(slots), k))))
    num_hosts = slots // sph
    for h in r["host_failures"]:
        for seed in range(r["seeds"]):
            rng = random.Random(f"host-{slots}-{h}-{seed}")
            hosts = rng.sample(range(num_hosts), h)
            out.append(("host", h * sph, h, {x * sph + i for x in hosts for i in range(sph)}))
            strided = {x + i * num_hosts for x in hosts for i in range(sph)}
            out.append(("host-strided", h * sph, h, strided))
    return out


def aggregate(rows: list[dict], expert_bytes: int) -> dict:
    def mean(key: str) -> float:
        return statistics.fmean(x[key] for x in rows)

    return {
        "trials": len(rows),
        "orphans_at_failure_mean": round(mean("orphans_at_failure"), 3),
        "orphans_at_failure_max": max(x["orphans_at_failure"] for x in rows),
        "p_orphan_at_failure": round(sum(x["orphans_at_failure"] > 0 for x in rows) / len(rows), 4),
        "orphans_after_repair_mean": round(mean("orphans_after_repair"), 3),
        "orphans_after_repair_max": max(x["orphans_after_repair"] for x in rows),
        "p_degraded_after_repair": round(
            sum(x["orphans_after_repair"] > 0 for x in rows) / len(rows), 4
        ),
        "copies_moved_mean": round(mean("copies"), 3),
        "copies_moved_max": max(x["copies"] for x in rows),
        "bytes_moved_mean": round(mean("copies") * expert_bytes),
        "bytes_from_checkpoint_mean": round(mean("copies_from_checkpoint") * expert_bytes),
        "bytes_moved_as_built_mean": round(mean("copies_as_built") * expert_bytes),
        "bytes_into_one_slot_max": max(x["max_copies_one_slot"] for x in rows) * expert_bytes,
        "restore_bytes_mean": round(mean("restore_copies") * expert_bytes),
        "restore_bytes_as_built_mean": round(mean("restore_copies_as_built") * expert_bytes),
        "restore_returns_home": all(x["restored_home"] for x in rows),
        "repair_ms_mean": round(mean("repair_s") * 1e3, 3),
        "repair_ms_max": round(max(x["repair_s"] for x in rows) * 1e3, 3),
        "restore_ms_mean": round(mean("restore_s") * 1e3, 3),
        "restore_ms_max": round(max(x["restore_s"] for x in rows) * 1e3, 3),
    }


def one_host(home: Placement, host_of: list[int]) -> int:
    """Experts whose every replica sits on one host (one host failure orphans them)."""
    hosts: list[set[int]] = [set() for _ in range(home.num_experts)]
    for p, e in enumerate(home.phy2log):
        if e >= 0:
            hosts[e].add(host_of[home.slot_of(p)])
    return sum(len(h) == 1 for h in hosts)


def simulate(r: dict, progress=print) -> tuple[list[dict], list[dict]]:
    """``(levels, cases)``: one entry per (EP size, distinct experts_per_slot), and per case
    (EP size, level, mode, failed slots) the aggregates over the seeds."""
    experts, sph, levels, cases = r["experts"], r["slots_per_host"], [], []
    for slots in r["ep"]:
        seen: dict[int, str] = {}
        sets = failed_sets(r, slots)
        for label in r["redundancy"]:
            eps = experts_per_slot(label, experts, slots)
            level = {"ep": slots, "hosts": slots // sph, "redundancy": label}
            level.update(experts_per_slot=eps, same_as=seen.get(eps))
            levels.append(level)
            if eps in seen:
                continue  # the same placement as an earlier level of this EP size
            seen[eps] = label
            t0 = time.perf_counter()
            home = initial_placement(experts, slots, eps)
            level["initial_placement_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
            level["redundant_physical_experts"] = home.capacity - experts
            level["max_replicas"] = home.max_replicas
            level["experts_on_one_host"] = one_host(home, [s // sph for s in range(slots)])
            strided = [s % (slots // sph) for s in range(slots)]
            level["experts_on_one_host_strided"] = one_host(home, strided)
            view1 = View(epoch=1, members=tuple(range(slots)), placement=home.to_json())
            rows: dict[tuple[str, int, int], list[dict]] = {}
            for mode, k, h, dead in sets:
                rows.setdefault((mode, k, h), []).append(trial(home, view1, dead))
            for (mode, k, h), got in rows.items():
                case = {"ep": slots, "redundancy": label, "experts_per_slot": eps}
                case.update(mode=mode, failed_slots=k, failed_hosts=h)
                cases.append({**case, **aggregate(got, r["expert_bytes"])})
            progress(
                f"EP{slots} x{eps} ({label}): {len(sets)} trials, {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
    return levels, cases


def provenance() -> dict:
    def git(*a: str) -> str | None:
        try:  # --no-optional-locks: never touch the index others may be committing through
            cmd = ["git", "--no-optional-locks", *a]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": (git("rev-parse", "HEAD") or "").strip() or None,
        "dirty": None if status is None else bool(status.strip()),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
    }


def table(r: dict, levels: list[dict], cases: list[dict]) -> str:
    """One row per distinct placement: P(any orphan at failure) and mean GB the repair moves
    at a few failure counts (``hostN``: N whole hosts; ``/s``: slots strided across hosts)."""
    index = {(c["ep"], c["redundancy"], c["mode"], c["failed_slots"]): c for c in cases}
    sph = r["slots_per_host"]
    cols = [("random", k, f"k={k}") for k in (1, 4, 16) if k in r["failures"]]
    cols += [("host", h * sph, f"host{h}") for h in r["host_failures"]]
    cols += [("host-strided", h * sph, f"host{h}/s") for h in r["host_failures"]]
    head = ["EP", "level", "eps", "spare", "1-host"] + [f"P(orph) {n}" for _, _, n in cols]
    lines = [" | ".join(head + [f"GB {n}" for _, _, n in cols] + ["repair ms"])]
    for lv in (x for x in levels if x["same_as"] is None):
        key = (lv["ep"], lv["redundancy"])
        row = [str(lv[k]) for k in ("ep", "redundancy", "experts_per_slot")]
        row += [str(lv["redundant_physical_experts"]), str(lv["experts_on_one_host"])]
        found = [index.get((*key, m, k)) for m, k, _ in cols]
        row += ["-" if c is None else f"{c['p_orphan_at_failure']:.2f}" for c in found]
        row += ["-" if c is None else f"{c['bytes_moved_mean'] / 1e9:.0f}" for c in found]
        mine = [c["repair_ms_mean"] for c in cases if (c["ep"], c["redundancy"]) == key]
        lines.append(" | ".join(row + [f"{statistics.fmean(mine):.1f}"]))
    return "\n".join(lines)


def plot(r: dict, levels: list[dict], cases: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    eps_sizes = sorted({lv["ep"] for lv in levels})
    labels = list(dict.fromkeys(lv["redundancy"] for lv in levels))
    styles, marks = ["-", "--", "-.", ":"], ["o", "s", "^", "D"]
    for lv in (x for x in levels if x["same_as"] is None):
        color = f"C{eps_sizes.index(lv['ep']) % 10}"
        i = labels.index(lv["redundancy"]) % 4
        mine = [c for c in cases if c["ep"] == lv["ep"] and c["redundancy"] == lv["redundancy"]]
        rnd = sorted((c for c in mine if c["mode"] == "random"), key=lambda c: c["failed_slots"])
        host = [c for c in mine if c["mode"] == "host"]
        strided = [c for c in mine if c["mode"] == "host-strided"]
        name = f"EP{lv['ep']} {lv['redundancy']} ({lv['experts_per_slot']}/slot)"
        for ax, key, scale in (
            (axes[0], "p_orphan_at_failure", 1),
            (axes[1], "bytes_moved_mean", 1e9),
        ):
            xs = [c["failed_slots"] for c in rnd]
            ax.plot(xs, [c[key] / scale for c in rnd], styles[i], color=color, label=name)
            for got, fill in ((host, "none"), (strided, "full")):
                ax.plot(
                    [c["failed_slots"] for c in got],
                    [c[key] / scale for c in got],
                    marks[i],
                    color=color,
                    markersize=8,
                    fillstyle=fill,
                    alpha=0.8,
                )
    axes[0].set_ylabel("P(some expert loses every replica)")
    axes[0].set_title(
        "lines: random slots; markers: whole hosts (hollow: slots numbered by host, as"
        " now;\nfilled: strided across hosts); every level < 2 replicas/expert is 1.0",
        fontsize=8,
    )
    axes[1].set_ylabel("GB the repair pulls (mean; changed live positions x expert bytes)")
    fig.suptitle(
        f"{r['model']}: {r['experts']} experts of {r['expert_bytes'] / 1e9:.2f} GB, hosts"
        f" of {r['slots_per_host']} slots, {r['seeds']} trials per point",
        fontsize=10,
    )
    for ax in axes:
        ax.set_xlabel("failed slots")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run(args: argparse.Namespace) -> int:
    r = resolve(args)
    prov = provenance()
    t0 = time.perf_counter()
    levels, cases = simulate(r)
    elapsed = time.perf_counter() - t0
    doc = {**prov, "args": vars(args), "resolved": r, "elapsed_s": round(elapsed, 1)}
    doc.update(levels=levels, cases=cases)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    path = args.plot if args.plot is not None else os.path.splitext(args.out)[0] + ".png"
    why = plot(r, levels, cases, path) if path else None
    print(table(r, levels, cases))
    print(
        f"{len(cases)} cases in {elapsed:.1f} s; wrote {args.out}"
        + (f" and {path}" if path and not why else "")
    )
    if why:
        print(why)
    bad = [c for c in cases if not c["restore_returns_home"]]
    return 1 if bad else 0
