"""The front-end SIGKILLed under live load: the launcher restarts it on the same URL, the ranks
re-attach to the new one and abort the dead one's requests (their KV freed), and a new request
is served within 5 s of the kill. No rank restarts: the view and the workers are untouched.

What a client sees: a stream in flight at the kill ends with a broken connection (no
``[DONE]``, no finish reason); connections are refused until the new front-end listens; then
the same URL serves. Nothing is replayed: the request log died with the process.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from eep.events import read_events
from eep.launcher import restart_delay
from eep.rank.status import StatusBlock
from eep.tools.common import scrape_metrics
from eep.tools.loadgen import Load, LoadSpec

from .conftest import prompts_for, start_cluster

pytestmark = pytest.mark.slow

SLOTS = 2
STREAMS = 6  # held streams: three on each rank at the kill
# long enough that no stream can end of itself between the kill and the ranks' re-attach: a
# rank's KV back to idle then means the old requests were aborted, not finished
MAX_TOKENS = 400
SERVED_WITHIN_S = 5.0


def wait_until(check, what: str, timeout_s: float = 60.0, every_s: float = 0.02):
    """Poll ``check()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def kv_free(cluster) -> list[int]:
    return [
        StatusBlock(cluster.cfg.cluster, s).get("kv_free") for s in range(cluster.cfg.num_slots)
    ]


def idle_kv(cluster) -> list[int]:
    """Every rank's free KV blocks when it holds no request."""
    return [cluster.cfg.rank_kv_tokens // cluster.cfg.block_size] * cluster.cfg.num_slots


def frontend_key(cluster) -> dict | None:
    kv = cluster.client.get(cluster.keys.frontend)
    return kv.json() if kv is not None else None


def serve_one(url: str, deadline: float) -> tuple[float, int]:
    """Send a small request until one is served (connections are refused while no front-end
    listens); returns when it completed and how many attempts were refused."""
    refused = 0
    while time.monotonic() < deadline:
        try:
            resp = requests.post(
                f"{url}/v1/completions",
                json={"prompt": [5, 6, 7], "max_tokens": 4},
                timeout=(1, 30),
            )
        except requests.ConnectionError:
            refused += 1
            time.sleep(0.02)
            continue
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["choices"][0]["token_ids"]) == 4
        return time.monotonic(), refused
    pytest.fail("no request was served after the front-end was killed")


def test_a_process_that_keeps_dying_at_once_is_backed_off_and_a_coordinator_waits_a_ttl():
    # a front-end is restarted at once, and again at once after one quick death; then backed off
    assert [restart_delay("frontend", n, ttl_s=2) for n in range(6)] == [0, 0, 0.5, 1, 2, 4]
    assert restart_delay("frontend", 50, ttl_s=2) == 10.0
    # a coordinator waits until the standby leads (the dead one's election key has expired)
    assert restart_delay("coordinator1", 0, ttl_s=2) == 3.0
    assert restart_delay("coordinator", 50, ttl_s=2) == 10.0


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = start_cluster(tiny_model_dir, tmp_path_factory.mktemp("frontend"), False, slots=SLOTS)
    try:
        wait_until(lambda: kv_free(c) == idle_kv(c), "ranks idle at the start")
        yield c
    finally:
        c.stop()


def test_a_killed_front_end_is_restarted_and_the_ranks_drop_its_requests(cluster):
    old_front = cluster.procs["frontend"]
    assert frontend_key(cluster)["pid"] == old_front.pid
    epoch = cluster.history()[-1].epoch
    workers = [cluster.wait_worker_pid(s) for s in range(SLOTS)]
    idle = idle_kv(cluster)

    load = Load(cluster.url, prompts_for(16), LoadSpec(max_tokens=MAX_TOKENS, streams=STREAMS))
    load.start()
    try:
        # live load: every stream has streamed and none ended; every rank holds KV for them
        wait_until(
            lambda: (
                len([s for s in load.snapshot() if s.times and not s.done]) == STREAMS
                and all(f < i for f, i in zip(kv_free(cluster), idle, strict=True))
            ),
            "every stream streaming and every rank holding KV",
        )
    except BaseException:
        load.stop(timeout_s=30)
        raise
    in_flight = [s for s in load.snapshot() if s.times and not s.done]
    busy = kv_free(cluster)
    os.kill(old_front.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with ThreadPoolExecutor(1) as pool:  # the load ends while the probe runs
        stopped = pool.submit(load.stop, 30.0)
        served_at, refused = serve_one(cluster.url, killed_at + 60)
        assert stopped.result() == 0, "a client stream hung after the kill"
    print(
        f"front-end SIGKILLed with {len(in_flight)} streams in flight (ranks' free KV {busy} "
        f"of {idle}); a new request served {served_at - killed_at:.2f} s after the kill "
        f"({refused} connections refused meanwhile)"
    )
    assert served_at - killed_at <= SERVED_WITHIN_S

    # the streams on the dead process ended in an error, not a finish, and did not hang
    for st in in_flight:
        assert st.done and st.error is not None and st.finish is None, st
        assert len(st.tokens) < MAX_TOKENS

    # a new process serves the same URL, and the restart is counted
    new_front = cluster.procs["frontend"]
    assert new_front.pid != old_front.pid and new_front.poll() is None
    assert old_front.returncode == -signal.SIGKILL
    assert frontend_key(cluster)["pid"] == new_front.pid
    assert cluster.restarts == {"frontend": 1}

    # the ranks aborted the old front-end's requests and freed their KV
    wait_until(lambda: kv_free(cluster) == idle, f"every rank's free KV back to {idle}")
    changed = [
        e
        for e in read_events(cluster.workdir)
        if e["event"] == "frontend_changed" and e["mono"] > killed_at
    ]
    assert sorted(e["slot"] for e in changed) == list(range(SLOTS)), changed
    assert sum(e["aborted"] for e in changed) >= len(in_flight), changed
    # and stopped at once: the new front-end got no more of their tokens than the one step a
    # rank may run between its re-attach and reading the news (a rank that ran them on would
    # send it hundreds)
    late = scrape_metrics(cluster.url)["eep_late_tokens_total"]
    assert late <= len(in_flight), f"{late} tokens of the old requests reached the new front-end"

    # no rank restarted: no view was committed and the workers are the same processes
    assert cluster.history()[-1].epoch == epoch
    assert [cluster.worker_pid(s) for s in range(SLOTS)] == workers
    state = requests.get(f"{cluster.url}/debug/slots", timeout=10).json()
    assert state["epoch"] == epoch and state["records"] == 0
    assert all(slot["live"] for slot in state["slots"].values()), state
