"""``eep bench placement --quick`` in-process: the simulated planner's figures obey what the
placement promises (two replicas survive any one slot failure; repair moves bytes only where
there is room; every dead slot back restores the home placement), and the JSON and the plot
are written. (The full run is in docs/benchmarks.md.)"""

from __future__ import annotations

import argparse
import json

import pytest

from eep.tools import bench_placement, cli


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_placement.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("placement") / "sim.json"
    assert bench_placement.run(_args("--quick", "--out", str(out))) == 0
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0  # matplotlib is in the test set-up
    return doc


def _case(doc: dict, ep: int, level: str, mode: str, k: int) -> dict:
    hits = [
        c
        for c in doc["cases"]
        if (c["ep"], c["redundancy"], c["mode"], c["failed_slots"]) == (ep, level, mode, k)
    ]
    assert len(hits) == 1, (ep, level, mode, k)
    return hits[0]


def test_registered_as_an_eep_bench():
    assert cli._BENCHES["placement"][0] == "bench_placement"


def test_the_json_names_its_commit_args_and_expert_bytes(quick):
    assert quick["date"] and "commit" in quick and quick["resolved"]["ep"] == [32, 64]
    # DeepSeek-V3 routed expert, bf16, all 58 MoE layers: 3 * 7168 * 2048 * 2 B * 58
    assert quick["resolved"]["expert_bytes"] == 5_108_662_272
    assert quick["cases"] and all(c["trials"] == 3 for c in quick["cases"])


def test_two_replicas_survive_one_failure_and_none_do_not(quick):
    for ep in (32, 64):
        two = _case(quick, ep, "2x", "random", 1)
        assert two["orphans_at_failure_max"] == 0 and two["bytes_moved_mean"] == 0
        bare = _case(quick, ep, "0", "random", 1)
        # one replica each: every expert of the dead slot is orphaned, and with no spare
        # position the repair cannot re-home any of them: the view stays degraded
        assert bare["orphans_at_failure_mean"] == 256 // ep
        assert bare["p_degraded_after_repair"] == 1.0 and bare["bytes_moved_mean"] == 0


def test_orphans_grow_with_failures_at_zero_redundancy(quick):
    means = [_case(quick, 32, "0", "random", k)["orphans_at_failure_mean"] for k in (1, 2, 4)]
    assert means[0] < means[1] < means[2]


def test_spare_room_repairs_and_moves_bytes(quick):
    one = _case(quick, 32, "1", "random", 1)
    assert one["orphans_at_failure_mean"] > 0 and one["orphans_after_repair_max"] == 0
    assert one["bytes_moved_mean"] > 0
    # the repair only ever re-homes orphans, whose only source is the checkpoint
    assert one["bytes_from_checkpoint_mean"] == one["bytes_moved_mean"]
    # as built, a slot whose experts change pulls its whole arena
    assert one["bytes_moved_as_built_mean"] >= one["bytes_moved_mean"]


def test_every_dead_slot_back_restores_home(quick):
    assert all(c["restore_returns_home"] for c in quick["cases"])
    assert all(c["restore_bytes_mean"] > 0 for c in quick["cases"])


def test_hosts_strided_keep_both_replicas_off_one_host(quick):
    for ep in (32, 64):
        level = next(x for x in quick["levels"] if (x["ep"], x["redundancy"]) == (ep, "2x"))
        assert level["experts_on_one_host_strided"] == 0
        assert _case(quick, ep, "2x", "host-strided", 8)["orphans_at_failure_max"] == 0
