"""``eep bench recovery`` end to end, shortened: a real 4-slot CPU cluster, an open-loop load,
one worker SIGKILLed into live load, the report written. Checks what the bench reads, not how
fast anything is."""

from __future__ import annotations

import json

import pytest

from eep.tools.cli import main


@pytest.mark.slow
def test_bench_recovery_elastic_run_reports_the_slot_out_and_back(tmp_path):
    out, table = tmp_path / "r.json", tmp_path / "r.txt"
    argv = ["bench", "recovery", "--modes", "elastic", "--rate", "4", "--max-tokens", "16"]
    argv += ["--prompts", "2", "--warmup", "1", "--at", "2", "--tail", "1", "--duration", "60"]
    argv += ["--log-dir", str(tmp_path / "logs"), "--out", str(out), "--plot", ""]
    assert main([*argv, "--table", str(table)]) == 0
    rep = json.loads(out.read_text())
    assert rep["resolved"]["max_num_seqs"] == 4 and rep["resolved"]["rate"] == 4.0
    assert rep["commit"] and rep["machine"]["cpu_count"] >= 1
    (run,) = rep["runs"]["elastic"]
    assert run["invariants"]["requests_lost"] == 0
    assert run["invariants"]["outputs_differing"] == 0
    fault = run["faults"][0]
    assert fault["requeued"] >= 1 and fault["tokens_during"] >= 1
    # the failed slot's own counter stood still between the view without it and its rejoin
    curve, tl = run["curve"], run["timeline"]
    first = next(i for i in range(len(curve["total"])) if curve["x0_s"] + i * 0.5 > 0.5)
    last = int((tl["rejoined"] - curve["x0_s"]) / 0.5) - 1
    assert last > first, "the slot was out for less than a bin"
    assert all(r == 0 for r in curve["per_slot"]["2"][first:last] if r is not None)
    assert tl["view_committed"] < tl["rejoined"]
    assert "elastic (1 runs)" in table.read_text()
