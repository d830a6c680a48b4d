"""`eep inspect` and `eep revoke` against a live cluster, as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from eep.membership.keys import Keys
from eep.membership.registry import SlotRegistration, SlotState
from eep.membership.session import Session

from .test_session_and_watch import _commit


def _eep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eep.tools.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_inspect_shows_members_view_and_history(etcd_server, etcd, cluster):
    keys = Keys(cluster)
    with Session(etcd) as session:
        reg = SlotRegistration(etcd, keys, session, slot=5, device="cuda:1")
        reg.register()
        reg.update(SlotState.READY)
        _commit(etcd, keys, [5])
        _commit(etcd, keys, [])
        common = ["--etcd", etcd_server.endpoint, "--cluster", cluster]
        table = _eep("inspect", *common)
        assert table.returncode == 0, table.stderr
        assert "cuda:1" in table.stdout and "ready" in table.stdout
        assert "view epoch 2: members []" in table.stdout
        assert re.search(r"^1 .*\[5\]", table.stdout, re.M)  # epoch 1 in the history table
        as_json = json.loads(_eep("inspect", *common, "--json").stdout)
        assert as_json["view"]["epoch"] == 2
        assert as_json["slots"]["5"]["state"] == "ready"
        assert [v["epoch"] for v in as_json["history"]] == [1, 2]

        revoked = _eep("revoke", *common, "--slot", "5")
        assert revoked.returncode == 0 and "lease revoked" in revoked.stdout
        assert etcd.get(keys.slot(5)) is None
        again = _eep("revoke", *common, "--slot", "5")
        assert again.returncode == 1 and "no matching registration" in again.stdout


def test_inspect_of_an_empty_cluster_says_so(etcd_server, cluster):
    out = _eep("inspect", "--etcd", etcd_server.endpoint, "--cluster", cluster)
    assert out.returncode == 0
    assert "no slots registered" in out.stdout and "no view committed yet" in out.stdout


def test_inspect_reports_a_malformed_view_without_a_traceback(etcd_server, etcd, cluster):
    etcd.put(Keys(cluster).view, "[]")
    out = _eep("inspect", "--etcd", etcd_server.endpoint, "--cluster", cluster)
    assert out.returncode == 2
    assert "must be a JSON object" in out.stdout and "Traceback" not in out.stderr
