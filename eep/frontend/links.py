"""The front-end's links to ranks: one TCP connection per slot, typed messages both ways.

A rank connects and says :class:`~eep.protocol.Hello`; a link of another protocol version is
dropped. A newer link of the same slot replaces the older one (a restarted worker). What
arrives is handed to the front-end's handlers; a malformed frame drops the link (the rank
reconnects).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from eep.protocol import (
    PROTOCOL_VERSION,
    FrameError,
    Hello,
    Migrated,
    MigrateReady,
    Tokens,
    ToRank,
    encode,
    read_message,
)

log = logging.getLogger("eep.frontend.links")


class LinkHandler(Protocol):
    def on_link_up(self, slot: int) -> None: ...
    def on_tokens(self, slot: int, incarnation: int, msg: Tokens) -> None: ...
    def on_migrate_ready(self, slot: int, msg: MigrateReady) -> None: ...
    def on_migrated(self, msg: Migrated) -> None: ...


class RankLinks:
    def __init__(self, handler: LinkHandler):
        self.handler = handler
        self._links: dict[int, tuple[int, asyncio.StreamWriter]] = {}

    def incarnation(self, slot: int) -> int | None:
        """The incarnation on ``slot``'s link, None when it has none."""
        link = self._links.get(slot)
        return link[0] if link else None

    def send(self, slot: int, msg: ToRank) -> bool:
        """Queue ``msg`` on ``slot``'s link; False when the slot has no link."""
        link = self._links.get(slot)
        if link is None:
            return False
        link[1].write(encode(msg))
        return True

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One rank's connection, from its hello until it closes (``asyncio.start_server``)."""
        slot = None
        try:
            hello = await read_message(reader)
            if not isinstance(hello, Hello):
                raise FrameError(f"a link must open with hello, not {hello.TYPE}")
            if hello.version != PROTOCOL_VERSION:
                raise FrameError(
                    f"slot {hello.slot} speaks protocol {hello.version}; this front-end speaks "
                    f"{PROTOCOL_VERSION}"
                )
            slot, incarnation = hello.slot, hello.incarnation
            self._links[slot] = (incarnation, writer)
            log.info("rank link up: slot %d incarnation %d", slot, incarnation)
            self.handler.on_link_up(slot)
            while True:
                msg = await read_message(reader)
                match msg:
                    case Tokens():
                        self.handler.on_tokens(slot, incarnation, msg)
                    case MigrateReady():
                        self.handler.on_migrate_ready(slot, msg)
                    case Migrated():
                        self.handler.on_migrated(msg)
                    case _:
                        raise FrameError(f"a rank does not send {msg.TYPE}")
        except FrameError as exc:
            log.warning("rank link dropped: slot %s: %s", slot, exc)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("rank link down: slot %s (%s)", slot, exc.__class__.__name__)
        finally:
            if slot is not None and self._links.get(slot, (None, None))[1] is writer:
                del self._links[slot]
            writer.close()
