"""View codec, reconciliation and the commit transaction against a real etcd."""

from __future__ import annotations

import json
import re
import threading

import pytest

from eep.membership.commit import commit_next, read_history, read_view
from eep.membership.coordinator import next_members
from eep.membership.errors import MalformedRecord, MalformedView, StaleView
from eep.membership.keys import Keys
from eep.membership.registry import SlotRecord, SlotState
from eep.membership.view import View


def _record(slot: int, incarnation: int, state: SlotState = SlotState.READY) -> SlotRecord:
    return SlotRecord(slot, incarnation, 100 + slot, "h", "cpu", 7, state)


def test_a_view_survives_its_json_codec():
    view = View(3, (0, 2, 5), ((5, 2), (0, 1), (2, 9)), {"log2phy": [[0, 1]]}, "removed [1]")
    back = View.from_json(view.to_json())
    assert back == view
    assert back.incarnation(2) == 9 and back.incarnation(1) is None


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"members": [0]}', "lacks the fields ['epoch']"),
        (b'{"epoch": 0, "members": [0]}', "epoch must be in [1, 2**63 - 1]"),
        (b'{"epoch": 1180591620717411303424, "members": [0]}', "epoch must be in [1, 2**63 - 1]"),
        (b'{"epoch": true, "members": [0]}', "epoch must be an integer"),
        (b'{"epoch": 2, "members": [1, 0]}', "sorted and unique"),
        (b'{"epoch": 2, "members": [0, 0]}', "sorted and unique"),
        (b'{"epoch": 2, "members": ["a"]}', "slot numbers"),
        (b'{"epoch": 2, "members": [0], "incarnations": {"3": 1}}', "not members"),
        (b'{"epoch": 2, "members": 5}', "must be a list"),
    ],
)
def test_a_malformed_view_is_a_clear_error(raw, words):
    with pytest.raises(MalformedView, match=re.escape(words)):
        View.from_json(raw, where="/eep/x/view")


def test_a_view_with_fields_this_version_does_not_know_is_read():
    raw = b'{"epoch": 2, "members": [0], "incarnations": {"0": 3}, "colour": "red"}'
    assert View.from_json(raw) == View(2, (0,), ((0, 3),), committed_at=0.0)


def test_reconciliation_drops_dead_and_restarted_members_and_admits_ready_ones():
    current = View(4, (0, 1, 2), ((0, 1), (1, 1), (2, 1)))
    records = {
        0: _record(0, 1),
        2: _record(2, 2, SlotState.JOINING),  # restarted: the old incarnation is gone
        3: _record(3, 1),
        4: _record(4, 1, SlotState.JOINING),
    }
    members, removed, added = next_members(current, records)
    assert removed == [1, 2] and added == [3]
    assert members == {0: 1, 3: 1}
    assert next_members(View(5, (0, 3), ((0, 1), (3, 1))), records)[1:] == ([], [])


def test_concurrent_committers_never_fork_or_skip_an_epoch(etcd, cluster):
    keys = Keys(cluster)
    committed = []
    lock = threading.Lock()

    def committer(name: str) -> None:
        for i in range(15):

            def decide(current, i=i):
                members = {0: 1, 1: 1} if current is None else dict(current.incarnations)
                payload = {"by": name, "i": i}
                if current is None:
                    return View(1, (0, 1), tuple(members.items()), payload, name)
                return current.next(members, payload, name)

            result = commit_next(etcd, keys, decide, max_attempts=100)
            assert result.committed
            with lock:
                committed.append(result.view.epoch)

    threads = [threading.Thread(target=committer, args=(f"w{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    history = read_history(etcd, keys)
    assert sorted(committed) == list(range(1, 61))
    assert [v.epoch for v in history] == list(range(1, 61))
    assert read_view(etcd, keys)[0].epoch == 60


def test_a_decision_that_skips_an_epoch_is_refused(etcd, cluster):
    keys = Keys(cluster)
    commit_next(etcd, keys, lambda cur: View(1, (0,), ((0, 1),)))
    with pytest.raises(StaleView, match="does not follow"):
        commit_next(etcd, keys, lambda cur: View(cur.epoch + 2, (0,), ((0, 1),)))
    assert read_view(etcd, keys)[0].epoch == 1


def test_a_decision_of_no_change_commits_nothing(etcd, cluster):
    keys = Keys(cluster)
    result = commit_next(etcd, keys, lambda cur: None)
    assert not result.committed and result.view is None
    assert etcd.get(keys.view) is None


def test_keys_refuse_a_cluster_name_that_would_escape_its_prefix():
    with pytest.raises(ValueError, match="cluster name"):
        Keys("a/../b")
    assert Keys("prod-1").slot(3) == "/eep/prod-1/slots/3"
    assert Keys("prod-1").view_at(12) == "/eep/prod-1/views/00000012"


def test_a_slot_record_round_trips_and_rejects_garbage():
    rec = _record(3, 4)
    assert SlotRecord.from_json(rec.to_json()) == rec
    assert json.loads(rec.to_json())["state"] == "ready"
    with pytest.raises(MalformedRecord, match=re.escape("lacks the fields ['device'")):
        SlotRecord.from_json(b'{"slot": 1}')
