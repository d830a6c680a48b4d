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
import threading
import time

from aiohttp import web

from eep.config import RuntimeConfig
from eep.membership.backoff import Backoff
from eep.membership.errors import MembershipError
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.session import Session, SessionConfig
from eep.membership.watcher import ViewWatcher

from .api import OpenAIApi
from .core import Frontend
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


async def serve(
    cfg: RuntimeConfig,
    etcd: str,
    host: str,
    http_port: int,
    vocab_size: int,
    ready: asyncio.Event | None = None,
    max_positions: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> None:
    """Run the front-end until cancelled. ``max_positions``: the model's
    ``max_position_embeddings``, which bounds the context a request may ask for;
    ``tokenizer``: the model's (:func:`.tokenizer.load_tokenizer`), None: byte-level."""
    client, keys = EtcdClient(etcd), Keys(cfg.cluster)
    front = Frontend(cfg, vocab_size, max_positions, tokenizer)
    front.links.load_secret(cfg.secret_file)  # ranks must prove they know it (eep.auth)
    loop = asyncio.get_running_loop()
    rank_server = await asyncio.start_server(front.links.handle, host, 0)
    rank_port = rank_server.sockets[0].getsockname()[1]
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # request on the rank (aiohttp lets handlers run on by default)
    runner = web.AppRunner(OpenAIApi(front).app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, http_port)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # the port chosen when 0 was asked
    address = {
        "http": {"host": host, "port": http_port},
        "ranks": {"host": host, "port": rank_port},
        "pid": os.getpid(),
        "instance": front.links.instance,  # what ranks compare to tell a restart (eep.rank.link)
        "since": time.time(),
    }
    watcher = ViewWatcher(
        client, keys, on_view=lambda v: loop.call_soon_threadsafe(front.on_view, v)
    ).start()
    log.info(
        "front-end %s: http://%s:%d (ranks on %d)",
        front.links.instance,
        host,
        http_port,
        rank_port,
    )
    session, stop = None, threading.Event()
    try:
        while True:
            # the front-end key lives under a session; when etcd is away the session is lost,
            # and the front-end serves on (ranks keep their links, requests keep streaming)
            # and publishes itself again once etcd answers
            session = await loop.run_in_executor(None, _publish, client, keys, cfg, address, stop)
            if session is None:
                return
            if ready is not None:
                ready.set()
            while not session.done.is_set():
                await asyncio.sleep(0.2)
            log.warning(
                "front-end: lost its etcd session (%s); serving on, re-publishing when etcd "
                "answers",
                session.loss,
            )
            session.close(revoke=False)
    finally:
        stop.set()  # a _publish still retrying gives up, so the process can exit
        watcher.stop()
        if session is not None:
            session.close()
        await runner.cleanup()
        rank_server.close()


def _publish(
    client: EtcdClient, keys: Keys, cfg: RuntimeConfig, address: dict, stop: threading.Event
) -> Session | None:
    """A session and the front-end key under it, retried with backoff (``Backoff``) until
    etcd answers (how ranks find this front-end); None once ``stop`` is set."""
    backoff = Backoff(log, "front-end")
    while not stop.is_set():
        session = Session(client, SessionConfig(ttl_s=cfg.ttl_s), name="frontend")
        try:
            session.open()
            client.put(keys.frontend, json.dumps(address), lease=session.lease_id)
            if tries := backoff.succeeded():
                log.info("front-end: published again after %d tries", tries)
            return session
        except MembershipError as exc:
            session.close(revoke=False)
            backoff.failed(str(exc), stop)
    return None
