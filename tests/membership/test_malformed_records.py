"""Foreign or malformed data in etcd is logged and ignored: nothing dies, nothing wedges.

Parsing is total (property tests: any bytes give a checked value or the typed error), and the
readers carry on around bad keys against a real etcd: the coordinator (a real process) keeps
committing views of exactly the well-formed slots, the watcher keeps delivering committed
views, a member registers over a garbage counter, and ``eep inspect`` names every bad key.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eep.membership.commit import commit_next, read_committed, read_history, read_view
from eep.membership.errors import INT64_MAX, MalformedRecord, MalformedView
from eep.membership.keys import Keys, parse_counter
from eep.membership.registry import SlotRecord, SlotRegistration, SlotState, revoke_slot
from eep.membership.session import Session
from eep.membership.view import View
from eep.membership.watcher import ViewWatcher

from .conftest import read_event

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TTL = 2
NUM_SLOTS = 32

# --- strategies -------------------------------------------------------------------------------

EDGE_INTS = st.sampled_from([-1, 0, 1, 2**31, 2**53 + 1, INT64_MAX, INT64_MAX + 1, 2**70, -(2**70)])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | EDGE_INTS
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
# values of the wrong type or range for some field: bools pass isinstance(x, int) in Python
WRONG = st.sampled_from(
    [True, False, "1", "a", "", 1.0, 1.5, -0.0, None, [], [1], {}, {"a": 1}, -1, 2**63, 2**70]
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)

RECORD_FIELDS = [
    "slot",
    "incarnation",
    "pid",
    "host",
    "device",
    "lease_id",
    "state",
    "endpoints",
    "registered_at",
    "resync_epoch",
    "suspects",
]
VIEW_FIELDS = ["epoch", "members", "incarnations", "placement", "reason", "committed_at"]


def _good(n: int, lease: int = 7, **over) -> dict:
    """A well-formed record of slot ``n``, with ``over`` replacing fields."""
    return {
        "slot": n,
        "incarnation": 1,
        "pid": 4242,
        "host": "h",
        "device": "cpu",
        "lease_id": lease,
        "state": "ready",
        "endpoints": {"pid": 4243},
        "registered_at": 1.5,
        "resync_epoch": 0,
        "suspects": [0, 5],
        **over,
    }


GOOD_VIEW = {
    "epoch": 3,
    "members": [0, 2],
    "incarnations": {"0": 1, "2": 4},
    "placement": {"any": ["json"]},
    "reason": "r",
    "committed_at": 2.5,
}


@st.composite
def _mutated(draw, base: dict, fields: list[str]) -> dict:
    """``base`` with 1-3 edits: a field replaced by any JSON value, removed, or one added."""
    obj = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["replace", "remove", "add"]))
        if edit == "replace":
            obj[draw(st.sampled_from(fields))] = draw(WRONG | EDGE_INTS | JSON)
        elif edit == "remove":
            obj.pop(draw(st.sampled_from(fields)), None)
        else:
            obj[draw(st.text(max_size=6))] = draw(JSON)
    return obj


def _is_int(value, lo: int = 0) -> bool:
    return type(value) is int and lo <= value <= INT64_MAX


def _check_record(rec: SlotRecord, obj: dict | None, key_slot: int, num_slots: int) -> None:
    """An independent check of a parsed record: exact types and ranges, and, given the JSON
    object it came from, that every field came through unchanged (nothing coerced)."""
    assert _is_int(rec.slot) and rec.slot == key_slot and rec.slot < num_slots
    assert _is_int(rec.incarnation, 1) and _is_int(rec.pid) and _is_int(rec.lease_id)
    assert _is_int(rec.resync_epoch)
    assert type(rec.suspects) is tuple and all(_is_int(s) and s < num_slots for s in rec.suspects)
    assert list(rec.suspects) == sorted(set(rec.suspects))
    assert type(rec.host) is str and type(rec.device) is str
    assert isinstance(rec.state, SlotState) and type(rec.endpoints) is dict
    assert type(rec.registered_at) is float and math.isfinite(rec.registered_at)
    if obj is not None:
        for name in ("slot", "incarnation", "pid", "lease_id", "host", "device"):
            assert type(obj[name]) is type(getattr(rec, name)) and obj[name] == getattr(rec, name)
        assert obj["state"] == rec.state.value
        assert obj.get("endpoints", {}) == rec.endpoints
        assert obj.get("resync_epoch", 0) == rec.resync_epoch
        assert obj.get("suspects", []) == list(rec.suspects)


def _check_view(view: View, obj: dict | None) -> None:
    assert _is_int(view.epoch, 1)
    assert all(_is_int(m) for m in view.members)
    assert list(view.members) == sorted(set(view.members))
    assert all(_is_int(s) and _is_int(i, 1) and s in view.members for s, i in view.incarnations)
    assert type(view.reason) is str and type(view.committed_at) is float
    assert math.isfinite(view.committed_at)
    if obj is not None:
        assert obj["epoch"] == view.epoch and type(obj["epoch"]) is int
        assert obj["members"] == list(view.members)
        assert {str(s): i for s, i in view.incarnations} == obj.get("incarnations", {})
        assert obj.get("reason", "") == view.reason


def _record_or_typed_error(raw: bytes, obj: dict | None = None) -> None:
    try:
        rec = SlotRecord.from_json(raw, "/eep/c/slots/1", key_slot=1, num_slots=8)
    except MalformedRecord as exc:
        assert "/eep/c/slots/1" in str(exc)  # the error names the key
        return
    _check_record(rec, obj, 1, 8)


def _view_or_typed_error(raw: bytes, obj: dict | None = None) -> None:
    try:
        view = View.from_json(raw, where="/eep/c/view")
    except MalformedView as exc:
        assert "/eep/c/view" in str(exc)
        return
    _check_view(view, obj)


# --- parsing is total -------------------------------------------------------------------------


@PROPERTY
@given(_mutated(_good(1), RECORD_FIELDS))
def test_a_mutated_slot_record_parses_exactly_or_is_a_typed_error(obj):
    _record_or_typed_error(json.dumps(obj).encode(), obj)


@PROPERTY
@given(_mutated(GOOD_VIEW, VIEW_FIELDS))
def test_a_mutated_view_parses_exactly_or_is_a_typed_error(obj):
    _view_or_typed_error(json.dumps(obj).encode(), obj)


@PROPERTY
@given(JSON)
def test_any_json_value_is_a_record_and_a_view_or_a_typed_error(value):
    raw = json.dumps(value).encode()
    _record_or_typed_error(raw)
    _view_or_typed_error(raw)


@PROPERTY
@given(st.binary(max_size=64), st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_arbitrary_bytes_are_a_record_and_a_view_or_a_typed_error(junk, at, spliced):
    _record_or_typed_error(junk)
    _view_or_typed_error(junk)
    for good in (json.dumps(_good(1)).encode(), json.dumps(GOOD_VIEW).encode()):
        broken = good[:at] + spliced + good[at:]  # e.g. a stray non-UTF-8 byte in a record
        _record_or_typed_error(broken)
        _view_or_typed_error(broken)


@PROPERTY
@given(st.integers(-5, 40), st.integers(0, 40))
def test_the_key_names_the_slot_and_the_body_must_agree(body_slot, key_slot):
    raw = json.dumps(_good(body_slot)).encode()
    if body_slot == key_slot and body_slot < 32:
        assert SlotRecord.from_json(raw, key_slot=key_slot, num_slots=32).slot == key_slot
    else:
        with pytest.raises(MalformedRecord):
            SlotRecord.from_json(raw, key_slot=key_slot, num_slots=32)


@PROPERTY
@given(st.text(max_size=24) | st.integers(-10, 2**70).map(str))
def test_key_names_are_numbers_spelled_one_way_or_a_typed_error(suffix):
    keys = Keys("c")
    for key, spell in ((keys.slots + suffix, str), (keys.views + suffix, "{:08d}".format)):
        try:
            number = keys.slot_of(key) if spell is str else keys.epoch_of(key)
        except MalformedRecord as exc:
            assert key in str(exc)
            continue
        assert _is_int(number) and spell(number) == suffix


@PROPERTY
@given(st.binary(max_size=24) | st.integers(-10, 2**70).map(lambda n: str(n).encode()))
def test_an_incarnation_counter_is_a_number_that_has_a_successor_or_a_typed_error(raw):
    try:
        counter = parse_counter(raw, "/eep/c/incarnations/0")
    except MalformedRecord:
        return
    assert type(counter) is int and 0 <= counter < INT64_MAX


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"epoch": NaN, "members": []}', "not JSON"),
        (b'{"epoch": 1, "members": [], "committed_at": Infinity}', "not JSON"),
        (b'{"epoch": 1, "members": [], "committed_at": 1e400}', "not JSON"),
        (b'{"epoch": 1' + b"0" * 5000 + b', "members": []}', "not JSON"),
        (b'{"epoch": 1, "members": [], "incarnations": {"01": 1}}', "not a slot number"),
        (b'{"epoch": 1, "members": [true]}', "slot numbers"),
        (b'{"epoch": 1, "members": [], "reason": 5}', "reason must be a str"),
        (b'{"epoch": 1, "members": [0], "incarnations": {"0": "2"}}', "must be an integer"),
    ],
)
def test_views_the_json_module_would_choke_on_or_coerce_are_typed_errors(raw, words):
    with pytest.raises(MalformedView, match=re.escape(words)):
        View.from_json(raw, where="/eep/c/view")


def test_unknown_fields_are_tolerated_and_missing_optional_ones_defaulted():
    obj = _good(3, colour="red")
    del obj["endpoints"], obj["registered_at"], obj["resync_epoch"], obj["suspects"]
    rec = SlotRecord.from_json(json.dumps(obj), key_slot=3)
    assert (rec.slot, rec.endpoints, rec.registered_at, rec.resync_epoch) == (3, {}, 0.0, 0)
    assert rec.suspects == ()


@pytest.mark.parametrize(
    "suspects, words",
    [
        ([2, 1], "sorted and unique"),
        ([1, 1], "sorted and unique"),
        ([True], "slot numbers"),
        (["1"], "slot numbers"),
        ([1.0], "slot numbers"),
        ([-1], "slot numbers in [0, 7]"),
        ([8], "slot numbers in [0, 7]"),
        ([[1]], "slot numbers"),
        (3, "must be a list"),
        (None, "must be a list"),
        ({"1": 1}, "must be a list"),
    ],
)
def test_garbage_suspects_make_the_record_malformed(suspects, words):
    raw = json.dumps(_good(1, suspects=suspects))
    with pytest.raises(MalformedRecord, match=re.escape(words)):
        SlotRecord.from_json(raw, "/eep/c/slots/1", key_slot=1, num_slots=8)


def test_suspects_round_trip_and_a_resync_request_replaces_them(etcd, cluster):
    keys = Keys(cluster)
    with Session(etcd) as session:
        reg = SlotRegistration(etcd, keys, session, 2)
        assert reg.register().suspects == ()
        reg.update(resync_epoch=4, suspects=[5, 1, 5])
        stored = SlotRecord.from_kv(etcd.get(keys.slot(2)), keys)
        assert (stored.resync_epoch, stored.suspects) == (4, (1, 5))
        assert json.loads(etcd.get(keys.slot(2)).value)["suspects"] == [1, 5]
        reg.update(SlotState.READY)  # other fields: the request stays whole
        assert SlotRecord.from_kv(etcd.get(keys.slot(2)), keys).suspects == (1, 5)
        reg.update(resync_epoch=5)  # a new request names its own suspects, here none
        stored = SlotRecord.from_kv(etcd.get(keys.slot(2)), keys)
        assert (stored.resync_epoch, stored.suspects, stored.state) == (5, (), SlotState.READY)


# --- commits and the history ------------------------------------------------------------------


def _commit(etcd, keys, members, reason="test"):
    def decide(cur):
        incs = {s: 1 for s in members}
        if cur is None:
            return View(1, tuple(members), tuple(incs.items()), reason=reason)
        return cur.next(incs, None, reason)

    return commit_next(etcd, keys, decide).view


def test_a_view_the_history_does_not_hold_is_not_built_on(etcd, cluster):
    keys = Keys(cluster)
    _commit(etcd, keys, [0])
    _commit(etcd, keys, [0, 1])
    for bad in (
        "{garbage",
        json.dumps({**GOOD_VIEW, "epoch": 2**62}),
        json.dumps({"epoch": 2**70}),
    ):
        etcd.put(keys.view, bad)
        assert read_view(etcd, keys)[0].epoch == 2  # the history's newest entry
    # nothing to commit: the pointer is restored from the history
    assert commit_next(etcd, keys, lambda cur: None).view.epoch == 2
    assert etcd.get(keys.view).value == etcd.get(keys.view_at(2)).value
    etcd.put(keys.view, etcd.get(keys.view_at(1)).value)  # an older entry, copied back
    assert read_view(etcd, keys)[0].epoch == 2
    assert commit_next(etcd, keys, lambda cur: None).view.epoch == 2
    assert etcd.get(keys.view).value == etcd.get(keys.view_at(2)).value
    etcd.put(keys.view, json.dumps({**GOOD_VIEW, "epoch": 2**62}))
    assert _commit(etcd, keys, [1]).epoch == 3  # committed over it, after epoch 2
    assert View.from_json(etcd.get(keys.view).value).members == (1,)


def test_an_epoch_whose_history_key_holds_garbage_is_skipped(etcd, cluster):
    keys = Keys(cluster)
    _commit(etcd, keys, [0])
    etcd.put(keys.view_at(2), b"\xff not a view")
    etcd.put(keys.views + "2", json.dumps(GOOD_VIEW))  # not a history key: ignored
    assert _commit(etcd, keys, [0, 1]).epoch == 3
    assert [v.epoch for v in read_history(etcd, keys)] == [1, 3]
    problems: dict[str, str] = {}
    assert read_committed(etcd, keys, scan=True, problems=problems).next_epoch == 4
    assert set(problems) == {keys.view_at(2), keys.views + "2"}


# --- the watcher ------------------------------------------------------------------------------


def test_the_watcher_delivers_committed_views_past_garbage_and_huge_epochs(etcd, cluster):
    keys = Keys(cluster)
    _commit(etcd, keys, [0])
    delivered: list[int] = []
    with ViewWatcher(etcd, keys, on_view=lambda v: delivered.append(v.epoch)) as watcher:
        assert watcher.wait_for(lambda v: v.epoch == 1, timeout_s=10)
        etcd.put(keys.view, "{garbage")
        etcd.put(keys.view, json.dumps({"epoch": 2**70, "members": []}))
        etcd.put(keys.view, View(2**62, (0, 5), ((5, 1),)).to_json())  # not in the history
        etcd.put(keys.view, View(2, (9,), ()).to_json())  # nor this one
        # a watcher that starts now reads the history's epoch 1, not the garbage
        with ViewWatcher(etcd, keys) as fresh:
            assert fresh.wait_for(lambda v: v.epoch == 1, timeout_s=10)
        assert _commit(etcd, keys, [0, 1]).epoch == 2
        assert _commit(etcd, keys, [1]).epoch == 3
        latest = watcher.wait_for(lambda v: v.epoch == 3, timeout_s=10)
        assert latest is not None and latest.members == (1,)
        assert delivered == [1, 2, 3]
        assert watcher.next(1).members == (0,) and watcher.next(1).members == (0, 1)


def test_a_callback_that_chokes_on_one_view_does_not_end_the_deliveries(etcd, cluster):
    keys = Keys(cluster)
    seen: list[int] = []

    def on_view(view):
        seen.append(view.epoch)
        if view.epoch == 2:
            raise ValueError("the consumer cannot read this placement")

    with ViewWatcher(etcd, keys, on_view=on_view) as watcher:
        for members in ([0], [0, 1], [1]):
            _commit(etcd, keys, members)
        assert watcher.wait_for(lambda v: v.epoch == 3, timeout_s=10)
        assert seen == [1, 2, 3]


def test_a_committed_view_far_beyond_the_last_is_reached_in_bounded_work(etcd, cluster):
    keys = Keys(cluster)
    _commit(etcd, keys, [0])
    far = 10**12
    with ViewWatcher(etcd, keys) as watcher:
        assert watcher.wait_for(lambda v: v.epoch == 1, timeout_s=10)
        # written by hand into both keys, the view is committed: the history is consistent
        raw = View(far, (0, 1), ((0, 1), (1, 1))).to_json()
        etcd.put(keys.view_at(far), raw)
        etcd.put(keys.view, raw)
        started = time.monotonic()
        assert watcher.wait_for(lambda v: v.epoch == far, timeout_s=10)
        assert time.monotonic() - started < 10  # one range read, not one per missing epoch
        assert _commit(etcd, keys, [0]).epoch == far + 1
        assert watcher.wait_for(lambda v: v.epoch == far + 1, timeout_s=10)


# --- registration and revocation --------------------------------------------------------------


def test_a_garbage_counter_and_a_record_bound_to_no_lease_do_not_stop_a_registration(etcd, cluster):
    keys = Keys(cluster)
    etcd.put(keys.incarnation(0), "banana")
    etcd.put(keys.slot(0), json.dumps(_good(0)))  # no lease: it would never expire
    with Session(etcd) as session:
        rec = SlotRegistration(etcd, keys, session, 0).register(wait_s=0)
        assert rec.incarnation > etcd.revision() - 5  # above anything the counter gave out
        assert etcd.get(keys.incarnation(0)).value == str(rec.incarnation).encode()
        assert etcd.get(keys.slot(0)).lease == session.lease_id
    with Session(etcd) as session:
        again = SlotRegistration(etcd, keys, session, 0).register(wait_s=5)
        assert again.incarnation == rec.incarnation + 1


def test_revoking_an_incarnation_leaves_a_malformed_record_alone(etcd, cluster):
    keys = Keys(cluster)
    with Session(etcd) as session:
        etcd.put(
            keys.slot(4), json.dumps(_good(4, session.lease_id, incarnation="1")), session.lease_id
        )
        assert not revoke_slot(etcd, keys, 4, incarnation=1)  # cannot show it is incarnation 1
        assert etcd.lease_ttl(session.lease_id) >= 0
        assert revoke_slot(etcd, keys, 4)  # `eep revoke --slot 4`: whatever holds the slot
        assert etcd.get(keys.slot(4)) is None


def test_the_planner_plans_from_home_over_a_placement_that_is_not_one():
    from eep.placement import Placement, initial_placement
    from eep.planner import next_placement

    home = initial_placement(8, 4, 4)
    for payload in ("x", {"num_experts": "8"}, initial_placement(6, 3, 4).to_json()):
        previous = View(5, (0, 1, 2, 3), (), payload)
        assert Placement.from_json(next_placement(home, [0, 1, 2, 3], previous)) == home


# --- a real coordinator among bad records -----------------------------------------------------


def _bad_records(keys: Keys, lease: int) -> dict[str, tuple[bytes, int]]:
    """Key -> (value, lease to bind it to): one of each class of bad record."""

    def rec(n, **over):
        return json.dumps(_good(n, lease, **over)).encode()

    return {
        keys.slot(3): (rec(3, slot="3"), lease),  # killed the coordinator: TypeError
        keys.slot(4): (rec(4, incarnation="a"), lease),  # killed it: ValueError
        keys.slot(5): (rec(5, slot=-1), lease),  # made it retry forever
        keys.slot(6): (rec(6, slot=0), lease),  # key and body disagree (slot 0 is good)
        keys.slot(7): (rec(7, incarnation=True), lease),
        keys.slot(8): (b"\xff\xfe not UTF-8", lease),
        keys.slot(9): (b"[1, 2, 3]", lease),
        keys.slot(10): (json.dumps({"slot": 10, "state": "ready"}).encode(), lease),
        keys.slot(11): (rec(11, state="dancing"), lease),
        keys.slot(12): (rec(12, incarnation=2**70), lease),
        keys.slot(13): (rec(13, lease_id=lease + 1), lease),  # names another lease
        keys.slot(14): (rec(14, endpoints=[1]), lease),
        keys.slot(15): (rec(15, pid=1.5), lease),
        keys.slot(16): (rec(16, registered_at="now"), lease),
        keys.slot(17): (rec(17, resync_epoch=-1), lease),
        keys.slot(18): (rec(18, host=None), lease),
        keys.slot(22): (rec(22, suspects=[3, 1]), lease),
        keys.slot(23): (rec(23, suspects=[NUM_SLOTS]), lease),
        keys.slot(19): (b"{not json", lease),
        keys.slot(20): (b"[" * 50_000, lease),
        keys.slot(21): (rec(21), 0),  # bound to no lease: would never expire
        keys.slot(NUM_SLOTS): (rec(NUM_SLOTS), lease),  # outside the cluster's slots
        keys.slots + "03": (rec(3), lease),  # not how a slot key is spelled
        keys.slots + "-1": (rec(-1), lease),
        keys.slots + "x": (rec(0), lease),
    }


def _lines_naming(log: str, key: str) -> int:
    return len(re.findall(re.escape(key) + r"(?![\w-])", log))


def test_the_coordinator_commits_exactly_the_good_slots_among_bad_records(
    procs, etcd, watcher, etcd_server
):
    keys = Keys(procs.cluster)
    etcd.put(keys.config, json.dumps({"num_slots": NUM_SLOTS}))
    etcd.put(keys.coordinator, "not a leader")  # bound to no lease: would block every election
    with Session(etcd) as held:
        lease = held.lease_id
        bad = _bad_records(keys, lease)
        before = list(bad)[::2]
        for key in before:
            etcd.put(key, *bad[key])
        # a record with a field this version does not know is read: slot 2 joins
        etcd.put(keys.slot(2), json.dumps(_good(2, lease, colour="red")), lease)
        coordinator = procs.coordinator(ttl=TTL, identity="c")
        members = {s: procs.member(s, ttl=TTL) for s in (0, 1)}
        for proc in members.values():
            read_event(proc, "ready")
        view = watcher.wait_for(lambda v: set(v.members) == {0, 1, 2}, timeout_s=30)
        assert view is not None, f"no view of the good slots; latest {watcher.latest}"
        for key in bad:
            if key not in before:
                etcd.put(key, *bad[key])
        # slot 2's record goes bad, slot 1's process dies: both leave, the rest stays
        etcd.put(keys.slot(2), json.dumps(_good(2, lease, slot="2")), lease)
        members[1].kill()
        revoke_slot(etcd, keys, 1)
        view = watcher.wait_for(lambda v: v.members == (0,), timeout_s=30)
        assert view is not None, f"no view of slot 0 alone; latest {watcher.latest}"
        time.sleep(2.5)  # two more reconcile ticks over the bad records
        assert coordinator.poll() is None, "the coordinator died"
        assert watcher.latest.members == (0,)
        assert all(set(v.members) <= {0, 1, 2} for v in read_history(etcd, keys))

        log = (procs.tmp_path / "coordinator-c.log").read_text(errors="replace")
        assert "Traceback" not in log
        for key in [*bad, keys.slot(2)]:
            assert _lines_naming(log, key) == 1, f"{key} reported {_lines_naming(log, key)}x"
        assert _lines_naming(log, keys.coordinator) == 1  # the leaseless election key, deleted

        common = ["--etcd", etcd_server.endpoint, "--cluster", procs.cluster]
        table = _eep("inspect", *common)
        assert table.returncode == 2 and "Traceback" not in table.stderr, table.stderr
        assert re.search(r"^0 +1 +ready +yes", table.stdout, re.M), table.stdout
        for key in [*bad, keys.slot(2)]:
            assert _lines_naming(table.stdout, key) >= 1, f"inspect does not name {key}"
        as_json = json.loads(_eep("inspect", *common, "--json").stdout)
        assert set(as_json["malformed"]) == {*bad, keys.slot(2)}
        assert list(as_json["slots"]) == ["0"] and as_json["view"]["members"] == [0]


def test_a_member_registers_over_a_garbage_counter_and_a_leaseless_record(procs, watcher, etcd):
    keys = Keys(procs.cluster)
    etcd.put(keys.incarnation(0), "not a number")
    etcd.put(keys.slot(0), "{left behind")
    procs.coordinator(ttl=TTL)
    first = procs.member(0, ttl=TTL)
    inc = read_event(first, "joining")["incarnation"]
    read_event(first, "ready")
    assert watcher.wait_for(lambda v: v.incarnation(0) == inc, timeout_s=30)
    first.kill()
    revoke_slot(etcd, keys, 0)
    second = procs.member(0, ttl=TTL)
    assert read_event(second, "joining")["incarnation"] == inc + 1
    assert watcher.wait_for(lambda v: v.incarnation(0) == inc + 1, timeout_s=30)


def _eep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eep.tools.cli", *args], capture_output=True, text=True, timeout=60
    )
