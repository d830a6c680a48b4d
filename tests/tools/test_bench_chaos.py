"""``eep bench chaos``: its invariant checks on synthetic runs whose answers are known, its
argument errors, and (slow) a short matrix on a real CPU cluster: worker-kill, agent-kill
and source-killed-mid-pull once each, every invariant 0 and every fault landed."""

from __future__ import annotations

import json

import pytest

from eep.membership.view import View
from eep.placement import initial_placement, repair
from eep.tools.chaos_checks import (
    INVARIANTS,
    RunSpan,
    collateral_exits,
    epoch_violations,
    orphan_violations,
    stream_counts,
)
from eep.tools.chaos_report import failed, totals
from eep.tools.cli import build_parser
from eep.tools.loadgen import Stream

REF = [[1, 2, 3, 4], [5, 6, 7, 8]]
SPAN = RunSpan(t0=0.0, t1=100.0, epoch_before=1, num_slots=4)


def _stream(prompt_idx: int, tokens: list[int], error: str | None = None) -> Stream:
    st = Stream(0, prompt_idx, 0.0, tokens=list(tokens), error=error)
    st.ended = 1.0
    return st


def _view(epoch: int, members: list[int], placement=None) -> View:
    home = placement or initial_placement(8, 4, 4)
    return View(epoch, tuple(members), tuple((s, 1) for s in members), home.to_json())


def test_clean_streams_break_no_invariant():
    counts = stream_counts([_stream(0, REF[0]), _stream(1, REF[1])], REF)
    assert counts == {"lost": 0, "dup_skip": 0, "differ": 0}


def test_a_repeated_token_and_a_skipped_token_are_counted():
    repeated = _stream(0, [1, 2, 2, 3])  # 2 repeated, then cut at max_tokens: 4 missing
    skipped = _stream(1, [5, 7, 8])
    counts = stream_counts([repeated, skipped], REF)
    assert counts["dup_skip"] == (2 + 2) + (2 + 3)
    assert counts["differ"] == 2
    assert counts["lost"] == 1  # the skipped stream is one token short


def test_a_stream_with_an_error_or_never_ended_is_lost():
    unended = _stream(1, [5])
    unended.ended = None
    counts = stream_counts([_stream(0, [1, 2], "ConnectionError: reset"), unended], REF)
    assert counts == {"lost": 2, "dup_skip": 0, "differ": 0}


def test_consecutive_epochs_seen_in_order_are_no_violation():
    history = [_view(e, [0, 1, 2, 3]) for e in (1, 2, 3, 4)]
    seen = [(float(e), v) for e, v in zip((2, 3, 4), history[1:], strict=True)]
    assert epoch_violations(history, seen, SPAN) == 0


def test_a_skipped_epoch_and_a_forked_view_are_violations():
    history = [_view(1, [0, 1, 2, 3]), _view(2, [0, 1, 2]), _view(4, [0, 1, 2, 3])]
    forked = _view(2, [0, 1, 3])  # epoch 2 as the watcher saw it, not as committed
    assert epoch_violations(history, [], SPAN) == 1
    assert epoch_violations(history, [(1.0, forked), (2.0, history[2])], SPAN) == 1 + 1 + 1


def test_an_orphaning_view_is_a_violation_only_if_tokens_flow_or_a_member_does_not_pause():
    home = initial_placement(8, 4, 2)  # one replica each: losing slot 3 orphans experts
    orphaned = repair(home, [0, 1, 2]).placement
    assert orphaned.orphans, "the test needs a placement with orphans"
    history = [_view(1, [0, 1, 2, 3], home), _view(2, [0, 1, 2], orphaned), _view(3, [0, 1, 2])]
    seen = [(10.0, history[1]), (20.0, history[2])]
    paused = [
        {"event": name, "slot": s, "epoch": 2, "mono": 10.1}
        for s in (0, 1, 2)
        for name in ("view_applied", "degraded")
    ]
    assert orphan_violations(history, seen, paused, [5.0, 10.2, 25.0], SPAN)[0] == 0
    assert orphan_violations(history, seen, paused, [15.0], SPAN)[0] == 1
    unpaused = [e for e in paused if not (e["slot"] == 1 and e["event"] == "degraded")]
    bad, records = orphan_violations(history, seen, unpaused, [], SPAN)
    assert bad == 1 and records[0]["members_not_degraded"] == [1]


def test_a_member_leaving_that_no_fault_hit_is_collateral():
    def view(epoch: int, incs: dict[int, int]) -> View:
        return View(epoch, tuple(sorted(incs)), tuple(incs.items()))

    history = [
        view(1, {0: 1, 1: 1, 2: 1, 3: 1}),
        view(2, {0: 1, 1: 1, 3: 1}),  # slot 2 killed by the run
        view(3, {0: 1, 3: 1}),  # slot 1 left too: nobody killed it
        view(4, {0: 1, 1: 2, 2: 2, 3: 1}),
    ]
    assert collateral_exits(history, SPAN, {(2, 1), (1, 1)}) == []
    assert collateral_exits(history, SPAN, {(2, 1)}) == [[1, 1]]


def test_a_missed_fault_or_any_invariant_fails_the_matrix():
    run = {
        "case": "worker-kill",
        "invariants": dict.fromkeys(("lost", "dup_skip", "differ", "stale", "epochs"), 0),
        "missed": None,
        "error": None,
        "landed": 1,
        "injected": 1,
        "timings": [{"excluded_s": 0.2, "rejoined_s": 9.0}],
    }
    assert not failed(totals([run]))
    assert failed(totals([{**run, "missed": "no request was streaming"}]))
    assert failed(totals([{**run, "landed": 0}]))
    assert failed(totals([{**run, "invariants": {**run["invariants"], "stale": 1}}]))


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--cases", "worker-kill,nope"], "name cases among"),
        (["--cases", "worker-kill,worker-kill"], "names a case twice"),
        (["--slots", "2"], "--slots must be >= 3"),
        (["--repeat", "0"], "--repeat must be >= 1"),
        (["--cases", "source-killed-mid-pull", "--pull-hold", "0"], "--pull-hold must be > 0"),
    ],
)
def test_bad_arguments_say_what_to_give(argv, says):
    from eep.tools.bench_chaos import check_args

    args = build_parser().parse_args(["bench", "chaos", *argv])
    with pytest.raises(SystemExit, match=says):
        check_args(args)


@pytest.mark.slow
def test_a_short_matrix_breaks_no_invariant_and_every_fault_lands(tmp_path):
    from eep.tools.bench_chaos import run

    out = tmp_path / "chaos.json"
    args = build_parser().parse_args(
        [
            "bench",
            "chaos",
            "--cases",
            "worker-kill,agent-kill,source-killed-mid-pull",
            "--repeat",
            "1",
            "--log-dir",
            str(tmp_path / "logs"),
            "--out",
            str(out),
        ]
    )
    code = run(args)
    report = json.loads(out.read_text())
    for case, t in report["totals"].items():
        assert t["runs"] == 1, case
        assert t["faults_landed"] == t["faults_injected"] >= 1, (case, t)
        bad = {k: t[k] for k in INVARIANTS}
        assert not any(bad.values()), (case, bad)
        assert t["missed"] == 0 and t["errors"] == 0, (case, report["runs"])
    assert code == 0
    assert report["commit"] and report["machine"]["cpu_count"]
