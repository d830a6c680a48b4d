"""Which host this process runs on: read once from the environment, in this module alone.

``EEP_HOST_ID`` names the host (default: its hostname); peers compare it with their own to
pick a same-host path (shared memory, a same-host transfer source). ``EEP_HOST_ADDR`` is the
address peers on other hosts reach this host's ranks at (default 127.0.0.1: one host). ``eep
launch --host-id --address`` sets both for every process it starts.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

ENV_HOST_ID = "EEP_HOST_ID"
ENV_HOST_ADDR = "EEP_HOST_ADDR"


@dataclass(frozen=True, slots=True)
class HostIdentity:
    host_id: str
    address: str

    def env(self) -> dict[str, str]:
        """The variables that give a child process this identity."""
        return {ENV_HOST_ID: self.host_id, ENV_HOST_ADDR: self.address}


def this_host() -> HostIdentity:
    host_id = os.environ.get(ENV_HOST_ID) or socket.gethostname()
    return HostIdentity(host_id, os.environ.get(ENV_HOST_ADDR) or "127.0.0.1")
