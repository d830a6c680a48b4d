"""The front-end's links to ranks: one TCP connection per slot, typed messages both ways.

Each accepted connection is challenged first: the front-end sends a fresh nonce and its
``instance`` (:class:`~eep.protocol.Challenge`; one random id per front-end process, by which a
rank tells a restarted front-end from a reconnect to the same one), and the peer must answer
within :data:`HELLO_TIMEOUT_S` with a :class:`~eep.protocol.Hello` of this protocol version
whose proof (:func:`eep.auth.proof` of the nonce, slot and incarnation under the cluster's
secret) checks out. Anything else (a wrong or missing proof, another version, silence, a first
frame that is not a hello) closes that connection without a word and is logged; the peer is
never registered, so it is sent nothing.

A newer authenticated link of the same slot replaces the older one (a restarted worker). What
arrives is handed to the front-end's handlers. A frame of the wrong shape or type, or any
error while handling one, closes that link alone (the rank reconnects); other links and the
HTTP API go on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Protocol

from eep.auth import load_secret, new_nonce, verify
from eep.protocol import (
    PROTOCOL_VERSION,
    Challenge,
    FrameError,
    Hello,
    Migrated,
    MigrateReady,
    Refused,
    Tokens,
    ToRank,
    encode,
    read_message,
)

log = logging.getLogger("eep.frontend.links")

HELLO_TIMEOUT_S = 10.0  # from accepting a connection to its verified hello


class LinkRefused(Exception):
    """A connection that did not authenticate as a rank; the message says why."""


class LinkHandler(Protocol):
    def on_link_up(self, slot: int) -> None: ...
    def on_tokens(self, slot: int, incarnation: int, msg: Tokens) -> None: ...
    def on_migrate_ready(self, slot: int, msg: MigrateReady) -> None: ...
    def on_migrated(self, msg: Migrated) -> None: ...
    def on_refused(self, slot: int, msg: Refused) -> None: ...


class RankLinks:
    """The rank links of one front-end. ``secret_file`` (or a later :meth:`load_secret`)
    names the cluster's secret; without one every connection is refused. ``instance``
    identifies this front-end process to the ranks (every challenge names it)."""

    def __init__(
        self,
        handler: LinkHandler,
        secret_file: str = "",
        hello_timeout_s: float = HELLO_TIMEOUT_S,
    ):
        self.handler = handler
        self.hello_timeout_s = hello_timeout_s
        self._secret: str | None = None
        self._links: dict[int, tuple[int, asyncio.StreamWriter]] = {}
        self.instance = secrets.token_hex(8)
        if secret_file:
            self.load_secret(secret_file)

    def load_secret(self, path: str) -> None:
        """Read the cluster's secret from ``path``; :class:`eep.auth.SecretError` if the file is
        missing, another user's or open to other users."""
        self._secret = load_secret(path)

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

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Hello:
        """Challenge the peer and return its verified hello; :class:`LinkRefused` otherwise."""
        if self._secret is None:
            raise LinkRefused("this front-end has no cluster secret loaded")
        nonce = new_nonce()
        writer.write(encode(Challenge(nonce, self.instance)))
        await writer.drain()
        hello = await read_message(reader)
        if not isinstance(hello, Hello):
            raise LinkRefused(f"a link must open with hello, not {hello.TYPE}")
        if hello.version != PROTOCOL_VERSION:
            raise LinkRefused(
                f"slot {hello.slot} speaks protocol {hello.version}; this front-end speaks "
                f"{PROTOCOL_VERSION}"
            )
        if not verify(self._secret, nonce, hello.slot, hello.incarnation, hello.proof):
            what = "no proof" if not hello.proof else "a wrong proof"
            raise LinkRefused(
                f"slot {hello.slot} incarnation {hello.incarnation} sent {what} of the "
                "cluster secret"
            )
        return hello

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: its handshake, then the rank's messages until it closes
        (``asyncio.start_server``)."""
        peer = writer.get_extra_info("peername")
        slot = None
        try:
            try:
                handshake = self._handshake(reader, writer)
                hello = await asyncio.wait_for(handshake, self.hello_timeout_s)
            except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
                raise LinkRefused(f"no hello within {self.hello_timeout_s:g} s") from None
            except FrameError as exc:
                raise LinkRefused(f"a malformed first frame: {exc}") from None
            slot, incarnation = hello.slot, hello.incarnation
            self._links[slot] = (incarnation, writer)
            log.info("rank link up: slot %d incarnation %d (%s)", slot, incarnation, peer)
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
                    case Refused():
                        self.handler.on_refused(slot, msg)
                    case _:
                        raise FrameError(f"a rank does not send {msg.TYPE}")
        except LinkRefused as exc:
            log.warning("rank link refused from %s: %s", peer, exc)
        except FrameError as exc:
            log.warning("rank link dropped: slot %s (%s): %s", slot, peer, exc)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("rank link down: slot %s (%s): %s", slot, peer, exc.__class__.__name__)
        except Exception:  # a frame the decoder or a handler chokes on: this link only
            log.exception("rank link dropped: slot %s (%s): error handling its frames", slot, peer)
        finally:
            if slot is not None and self._links.get(slot, (None, None))[1] is writer:
                del self._links[slot]
            writer.close()
