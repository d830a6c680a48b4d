"""``eep bench recovery`` end to end, shortened: a real 4-slot CPU cluster, its capacity, an
open-loop load, one worker SIGSTOPped in live load, the report written. Checks what the bench
reads, not how fast anything is."""

from __future__ import annotations

import json

import pytest

from eep.tools.cli import main


@pytest.mark.slow
def test_bench_recovery_cold_run_reports_the_hung_slot_out_and_back(tmp_path):
    out, table = tmp_path / "r.json", tmp_path / "r.txt"
    # the default capacity mode, shortened: at 0.9 of saturation every slot holds requests
    # cold restarts (no standby): a promoted standby can be ready within the coordinator's
    # debounce of the hung incarnation's lease expiry, and then one view replaces the slot's
    # incarnation, with no view without it to read (seen once on a fresh clone); the standby's
    # own path is tests/e2e/test_standby.py's
    argv = ["bench", "recovery", "--modes", "elastic-cold", "--max-tokens", "32"]
    argv += ["--prompts", "2"]
    argv += ["--capacity-warmup", "1", "--capacity-s", "2", "--warmup", "1", "--at", "2"]
    argv += ["--tail", "1", "--duration", "60", "--log-dir", str(tmp_path / "logs")]
    argv += ["--fault", "stop"]  # a hung worker: out for a TTL and a restart, several bins
    assert main([*argv, "--out", str(out), "--plot", "", "--table", str(table)]) == 0
    rep = json.loads(out.read_text())
    assert rep["resolved"]["max_num_seqs"] == 4 and rep["resolved"]["load_factor"] == 0.9
    assert rep["commit"] and rep["machine"]["cpu_count"] >= 1
    (run,) = rep["runs"]["elastic-cold"]
    offered = run["load"]["spec"]["rate"] * 32
    assert offered == pytest.approx(0.9 * run["capacity"]["tokens_per_s"])
    assert run["invariants"]["requests_lost"] == 0
    assert run["invariants"]["outputs_differing"] == 0
    fault = run["faults"][0]
    assert fault["requeued"] >= 1 and fault["tokens_during"] >= 1
    # the hung slot's own counter stood still from the fault to its rejoin; the polled
    # counter is interpolated between polls, so a poll's width is left at either end
    curve, tl = run["curve"], run["timeline"]
    starts = [curve["x0_s"] + i * 0.5 for i in range(len(curve["total"]))]
    inside = [i for i, t in enumerate(starts) if t >= 1.0 and t + 0.5 <= tl["rejoined"] - 1.0]
    assert inside, "the slot was out too briefly to read"
    assert all(curve["per_slot"]["2"][i] in (0, None) for i in inside)
    assert any(curve["per_slot"]["0"]), "slot 0's counter was never read"
    assert tl["view_committed"] < tl["rejoined"]
    assert "elastic-cold (1 runs)" in table.read_text()
