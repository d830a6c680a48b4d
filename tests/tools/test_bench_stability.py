"""``eep bench stability`` end to end, short: one clean launch and a few seconds of load, and
the bench's own counts of view changes, restarts and fences are all zero. (The full run, 20
launches and 10 minutes of load, is in docs/benchmarks.md.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_a_clean_launch_under_load_changes_no_view(tmp_path):
    out = tmp_path / "stability.json"
    proc = subprocess.run(
        [sys.executable, "-m", "eep.tools.cli", "bench", "stability", "--launches", "1"]
        + ["--load-s", "5", "--out", str(out), "--log-dir", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["came_up"] == 1 and summary["load"]["requests"] >= 1
    assert (summary["view_changes"], summary["restarts"], summary["fences"]) == (0, 0, 0)
