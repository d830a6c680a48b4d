"""The worker's side of suspicion, on a stand-in worker (no model, no fabric): the suspects of
an epoch's failed exchanges accumulate, and the resync request publishes them with the epoch
through the status block."""

from __future__ import annotations

import threading
import time
import types
import uuid

from eep.membership.view import View
from eep.rank.status import StatusBlock
from eep.rank.worker import Worker


def _stand_in(status: StatusBlock, slot: int = 1):
    return types.SimpleNamespace(
        slot=slot,
        suspected={},
        status=status,
        cfg=types.SimpleNamespace(ttl_s=0),
        watcher=types.SimpleNamespace(latest=View(4, (0, 1, 2, 3))),
        heartbeat=lambda: None,
        _ctx=lambda: "stand-in",
    )


def test_a_resync_request_names_the_suspects_of_its_epoch_only():
    status = StatusBlock(f"test-suspects-{uuid.uuid4().hex[:6]}", 1, create=True)
    try:
        worker = _stand_in(status)
        Worker.suspect(worker, 3, (2,))
        Worker.suspect(worker, 4, (3,))  # a newer epoch forgets the older one's
        Worker.suspect(worker, 4, (0, 1, 300))  # itself and slots past the bitmap are left out
        assert worker.suspected == {4: {0, 3}}
        asked = threading.Thread(target=Worker.await_newer_view, args=(worker, 4), daemon=True)
        asked.start()
        deadline = time.monotonic() + 20  # ttl 0: the request comes after 1 s
        while status.resync_request() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert status.resync_request() == (4, (0, 3))
        worker.watcher.latest = View(5, (0, 1, 2, 3))  # the newer view ends the wait
        asked.join(timeout=10)
        assert not asked.is_alive()
    finally:
        status.close(unlink=True)
