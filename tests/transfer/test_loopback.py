"""Mooncake's TCP transport listens on the loopback interface only (eep.transfer.loopback):
its own binds to the wildcard address are redirected; a process that binds 0.0.0.0 through
Python is not affected."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

CODE = """
import os, socket, subprocess
from eep.transfer.config import TransferConfig
from eep.transfer.engine import start_transport
t = start_transport(TransferConfig(protocol="tcp"))
mine = socket.socket()
mine.bind(("0.0.0.0", 0))
mine.listen()
out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
print(t.session)
print(mine.getsockname()[1])
for line in out.splitlines():
    if f"pid={os.getpid()}," in line:
        print(line.split()[3])
"""


def test_the_transfer_engine_listens_on_loopback_alone():
    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed: cannot list listening sockets")
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    session, own_port, listeners = out[0], int(out[1]), out[2:]
    own = [a for a in listeners if a.endswith(f":{own_port}")]
    mooncake = [a for a in listeners if a not in own]
    assert own == [f"0.0.0.0:{own_port}"], "a bind outside Mooncake must not be touched"
    assert len(mooncake) >= 1 and f"127.0.0.1:{session.rpartition(':')[2]}" in mooncake
    assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in mooncake), mooncake
