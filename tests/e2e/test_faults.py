"""A rank SIGKILLed or SIGSTOPped under live load, a restarted rank rejoining, two ranks killed
at once, a rank killed while another recovers. Every fault is injected only once requests
stream on its slot, and every test proves that it landed (requests re-queued off the slot,
tokens delivered meanwhile); every request completes with the single-process result. Waits
are for the states expected, with generous timeouts, never speed assertions."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from eep.engine.sampling import SamplingParams
from eep.tools import faults
from eep.tools.common import scrape_metrics

from .conftest import (
    complete,
    kill_and_recover,
    load_with_faults,
    prompts_for,
    reference_outputs,
    start_cluster,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    # the cold path: a killed worker's replacement starts from nothing, so a rejoin takes
    # long enough for load to build up on the survivors and be moved back with its KV
    # (tests/e2e/test_standby.py covers the warm standby; the other e2e modules run with it)
    c = start_cluster(
        tiny_model_dir, tmp_path_factory.mktemp("faults"), torchrun=False, standby=False
    )
    yield c
    c.stop()


def _metric(url: str, name: str) -> float:
    return scrape_metrics(url)[name]


def _assert_epochs_consecutive(cluster) -> None:
    epochs = [v.epoch for v in cluster.history()]
    assert epochs == list(range(1, len(epochs) + 1)), f"epochs forked or skipped: {epochs}"


def test_a_rank_killed_mid_decode_loses_no_request(cluster, tiny_model_dir):
    fault = load_with_faults(cluster, tiny_model_dir, kill_and_recover(cluster, 2))
    assert fault.requeued >= 1 and fault.tokens_during >= 1
    assert _metric(cluster.url, "eep_duplicate_tokens_total") == 0
    assert _metric(cluster.url, "eep_stale_accepted_total") == 0
    _assert_epochs_consecutive(cluster)


def test_the_restarted_rank_rejoins_and_serves_new_requests(cluster, tiny_model_dir):
    before = cluster.watcher.latest
    os.kill(cluster.wait_worker_pid(1), signal.SIGKILL)
    back = cluster.watcher.wait_for(
        lambda v: (
            (v.incarnation(1) or 0) > before.incarnation(1)
            and len(v.members) == cluster.cfg.num_slots
        ),
        timeout_s=180,
    )
    assert back is not None, "slot 1 did not rejoin"
    inc = back.incarnation(1)
    prompts = prompts_for(8)
    expected = reference_outputs(tiny_model_dir, prompts, [SamplingParams(max_tokens=6)] * 8)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda p: complete(cluster.url, {"prompt": p, "max_tokens": 6}), prompts)
        )
    assert [r["choices"][0]["token_ids"] for r in results] == expected
    log = open(os.path.join(cluster.workdir, f"worker1.{inc}.log")).read()
    assert "serving view" in log


def test_two_ranks_killed_at_once_lose_no_request(cluster, tiny_model_dir):
    def kill_two(load):
        first = faults.inject(cluster, 0)
        second = faults.inject(cluster, 3)
        for fault in (first, second):
            faults.wait_excluded(cluster, fault)
            faults.wait_requeued(cluster.url, fault)
        for fault in (first, second):
            faults.wait_rejoined(cluster, fault)
        return [faults.prove(f, load, cluster.url) for f in (first, second)]

    done = load_with_faults(cluster, tiny_model_dir, kill_two)
    assert all(f.requeued >= 1 for f in done)
    assert _metric(cluster.url, "eep_duplicate_tokens_total") == 0
    _assert_epochs_consecutive(cluster)


def test_a_hung_rank_is_excluded_by_lease_expiry_and_restarted(cluster, tiny_model_dir):
    fault = load_with_faults(
        cluster, tiny_model_dir, kill_and_recover(cluster, 1, sig=signal.SIGSTOP)
    )
    assert fault.requeued >= 1
    assert cluster.wait_worker_pid(1) != fault.pid
    with pytest.raises(ProcessLookupError):
        os.kill(fault.pid, 0)  # the supervisor killed the hung worker before restarting it


def test_a_rejoined_rank_takes_in_flight_requests_with_their_kv(cluster, tiny_model_dir):
    # long requests, held continuously: some are mid-decode (with KV to move) at the rejoin
    fault = load_with_faults(
        cluster,
        tiny_model_dir,
        kill_and_recover(cluster, 3, migration=True),
        streams=16,
        max_tokens=200,
    )
    assert fault.migrated >= 1
    assert _metric(cluster.url, "eep_duplicate_tokens_total") == 0
    inc = cluster.watcher.latest.incarnation(3)
    events = open(os.path.join(cluster.workdir, f"events-worker3.{inc}.jsonl")).read()
    assert '"event": "kv_migrated"' in events and '"ok": true' in events


def test_a_rank_killed_while_another_recovers_loses_no_request(cluster, tiny_model_dir):
    def kill_during_recovery(load):
        first = faults.inject(cluster, 1)
        faults.wait_excluded(cluster, first)
        # slot 1's next worker is starting (seconds of imports and loading): kill another now
        second = faults.inject(cluster, 2)
        recovering = (cluster.watcher.latest.incarnation(1) or 0) <= first.old_incarnation
        for fault in (first, second):
            faults.wait_requeued(cluster.url, fault)
        for fault in (first, second):
            faults.wait_rejoined(cluster, fault)
        return recovering, [faults.prove(f, load, cluster.url) for f in (first, second)]

    recovering, _ = load_with_faults(cluster, tiny_model_dir, kill_during_recovery, max_tokens=40)
    assert recovering, "slot 1 was back before slot 2 was killed: not a kill during recovery"
    assert _metric(cluster.url, "eep_duplicate_tokens_total") == 0
    _assert_epochs_consecutive(cluster)


def test_a_fault_on_an_idle_cluster_is_reported_as_missed(cluster):
    # the instrument itself can fail: no load on the slot, no fault is sent
    with pytest.raises(faults.FaultMissed, match="never held"):
        faults.wait_live_load(cluster.url, 2, timeout_s=2)
    # and a fault that re-queued nothing does not prove anything
    idle = faults.Fault(
        slot=2,
        target="worker",
        signal="SIGKILL",
        pid=0,
        at=0.0,
        old_incarnation=None,
        in_flight=0,
        emitting=0,
        requeued_before=faults.slots_state(cluster.url)["slots"][2]["requeued_from"],
        migrated_before=0,
        epoch_before=0,
    )
    with pytest.raises(faults.FaultMissed, match="no request was streaming"):
        faults.prove(idle, None, cluster.url)
