"""The front-end process: the rank port, the HTTP port, its etcd session and the view feed.

The rooms: :mod:`.core` holds the state (the request log, the view, the counters) and the
bookkeeping of re-queues and migrations; :mod:`.assign` decides where requests run (pure);
:mod:`.links` talks to ranks; :mod:`.api` is the OpenAI-compatible HTTP layer; :mod:`.metrics`
exports counters. :func:`serve` wires them together and runs until cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from aiohttp import web

from eep.config import RuntimeConfig
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.session import Session, SessionConfig
from eep.membership.watcher import ViewWatcher

from .api import OpenAIApi
from .core import Frontend

log = logging.getLogger(__name__)


async def serve(
    cfg: RuntimeConfig,
    etcd: str,
    host: str,
    http_port: int,
    vocab_size: int,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the front-end until cancelled."""
    client, keys = EtcdClient(etcd), Keys(cfg.cluster)
    front = Frontend(cfg, vocab_size)
    loop = asyncio.get_running_loop()
    rank_server = await asyncio.start_server(front.links.handle, host, 0)
    rank_port = rank_server.sockets[0].getsockname()[1]
    runner = web.AppRunner(OpenAIApi(front).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, http_port)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # the port chosen when 0 was asked
    session = Session(client, SessionConfig(ttl_s=cfg.ttl_s), name="frontend").open()
    address = {
        "http": {"host": host, "port": http_port},
        "ranks": {"host": host, "port": rank_port},
        "pid": os.getpid(),
        "since": time.time(),
    }
    client.put(keys.frontend, json.dumps(address), lease=session.lease_id)
    watcher = ViewWatcher(
        client, keys, on_view=lambda v: loop.call_soon_threadsafe(front.on_view, v)
    ).start()
    log.info("front-end: http://%s:%d (ranks on %d)", host, http_port, rank_port)
    if ready is not None:
        ready.set()
    try:
        while not session.done.is_set():
            await asyncio.sleep(0.2)
        log.error("front-end: lost its etcd session (%s); exiting", session.loss)
    finally:
        watcher.stop()
        session.close()
        await runner.cleanup()
        rank_server.close()
