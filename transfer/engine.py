"""The one wrapper over the Mooncake Transfer Engine (``mooncake.engine.TransferEngine``).

Nothing else in the project imports ``mooncake``. Every non-zero return code becomes a typed
error naming the operation and the peer. Two ways to move bytes:

- ``read_batch`` / ``write_batch``: one batched, synchronous call (bounded by the engine's own
  timeout, ``TransferConfig.engine_timeout_s``);
- ``submit`` / ``poll``: one asynchronous request at a time, so the executor keeps several in
  flight per source, polls them with its own deadlines, and abandons a hung source at once.

Findings that shaped this file (Mooncake 0.3.13, read from its Python binding and engine):
``initialize(..., protocol, ...)`` picks only the *memory allocator* from ``protocol``; the
transport actually installed comes from topology auto-discovery: RDMA when NICs are found,
otherwise TCP, and the intra-host NVLink transport only when ``MC_INTRANODE_NVLINK`` is set.
So ``nvlink_intra`` without that variable silently moves GPU memory over TCP through the
host (the 1.7 GB/s of the first try). ``tcp`` likewise needs ``MC_FORCE_TCP`` on a machine with
NICs. This wrapper sets both from the configured protocol and reports the installed transport.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .config import TransferConfig
from .errors import EngineError, PeerUnreachable, TransferFailed
from .transport import Op, PeerRef, Poll, Region, Ticket

# the transports' shared types, importable from here as before
__all__ = ["MooncakeTransport", "Op", "PeerRef", "Poll", "Region", "Ticket", "start_transport"]

log = logging.getLogger(__name__)


def _protocol_env(protocol: str) -> dict[str, str]:
    if protocol == "tcp":
        return {"MC_FORCE_TCP": "1"}
    if protocol == "nvlink_intra":
        return {"MC_INTRANODE_NVLINK": "1"}
    return {}


@dataclass
class MooncakeTransport:
    """A started Mooncake engine: ``session`` is what peers pass to reach it."""

    config: TransferConfig
    session: str = ""
    _te: object = field(default=None, repr=False)
    _registered: dict[int, int] = field(default_factory=dict, repr=False)
    _reachable: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def start(cls, config: TransferConfig) -> MooncakeTransport:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise EngineError(
                "the Mooncake Transfer Engine is not installed: `pip install -e .[cpu]` "
                "(mooncake-transfer-engine-non-cuda) on CPU machines, `.[cuda13]` on GPU ones."
            ) from exc
        if config.protocol == "cuda_ipc":
            raise EngineError("protocol cuda_ipc is served by eep.transfer.ipc, not Mooncake.")
        env = {"MC_TRANSFER_TIMEOUT": str(config.engine_timeout_s)}
        env.update(_protocol_env(config.protocol))
        if config.protocol == "tcp":
            env.setdefault("MC_TCP_BIND_ADDRESS", os.environ.get("MC_TCP_BIND_ADDRESS", ""))
            if not env["MC_TCP_BIND_ADDRESS"]:
                env["MC_TCP_BIND_ADDRESS"] = config.hostname
        env.update(dict(config.engine_env))
        # The binding reads these when the engine is built and initialised: set first.
        for key, value in env.items():
            if value:
                os.environ[key] = value
            else:
                os.environ.pop(key, None)
        if config.protocol == "tcp" and (bind_to := _ipv4(config.hostname)):
            # Mooncake's TCP transport binds its ports to the wildcard address whatever it is
            # told: keep them on the address peers are told (loopback on a one-host cluster,
            # the host's own on several), so no other interface serves registered memory
            from .loopback import confine_binds

            confine_binds("mooncake/engine.so", "mooncake/libasio.so", address=bind_to)
        self = cls(config=config)
        te = TransferEngine()
        rc = te.initialize(
            config.hostname, config.metadata_url, config.protocol, config.device_name
        )
        if rc != 0:
            raise EngineError(
                f"Mooncake initialize(hostname={config.hostname!r}, metadata="
                f"{config.metadata_url!r}, protocol={config.protocol!r}) returned {rc}. "
                "Check that the hostname is an address of this machine and that the "
                "metadata server (etcd) answers."
            )
        self._te = te
        self.session = f"{config.hostname}:{te.get_rpc_port()}"
        log.info("mooncake engine up: session %s protocol %s", self.session, config.protocol)
        return self

    # --- memory ----------------------------------------------------------------------------

    def register(self, addr: int, nbytes: int, location: str) -> str:
        """Register ``[addr, addr + nbytes)``; ``location`` is ``cpu:0`` or ``cuda:N``.
        Returns the region's IPC descriptor (always empty here)."""
        rc = self._te.register_memory(addr, nbytes, location)
        if rc != 0:
            raise EngineError(
                f"register_memory(addr={addr:#x}, nbytes={nbytes}, location={location!r}) "
                f"returned {rc}: the memory must stay allocated while registered, and GPU "
                "memory needs the CUDA build of Mooncake."
            )
        self._registered[addr] = nbytes
        return ""

    def unregister(self, addr: int) -> None:
        if self._registered.pop(addr, None) is None:
            return
        rc = self._te.unregister_memory(addr)
        if rc != 0:
            raise EngineError(f"unregister_memory(addr={addr:#x}) returned {rc}.")

    # --- peers -----------------------------------------------------------------------------

    def check_reachable(
        self,
        peer: PeerRef,
        on_wait: Callable[[], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Probe the peer once, bounded by ``connect_timeout_s`` (or ``timeout_s``, if
        shorter); ``on_wait`` is called every 50 ms meanwhile (a rank's fabric keeps its
        progress moving while it waits). Raises :class:`PeerUnreachable`.

        Needed because the engine's first contact with a peer (its metadata handshake) reads
        with a fixed 60 s socket timeout while holding the engine's lock: a peer that is alive
        but hung would stall every transfer of this process for a minute. The probe runs in a
        daemon thread that holds no engine lock; a hung peer leaves only that thread waiting.
        """
        failed = self.probe_many([peer], on_wait, timeout_s)
        if failed:
            raise failed[peer.session]

    def probe_many(
        self,
        peers: Sequence[PeerRef],
        on_wait: Callable[[], None] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, PeerUnreachable]:
        """Probe every peer not known reachable, all at once (see :meth:`check_reachable`);
        returns ``{session: error}`` of those that did not answer."""
        limit = self.config.connect_timeout_s
        limit = limit if timeout_s is None else max(0.0, min(limit, timeout_s))
        results: dict[str, list[int]] = {}
        threads = []
        for peer in peers:
            if peer.session in self._reachable or peer.session in results:
                continue
            out: list[int] = []
            results[peer.session] = out
            probe = threading.Thread(
                target=lambda session=peer.session, out=out: out.append(
                    self._te.send_probe(session)
                ),
                name=f"eep-probe-{peer.holder}",
                daemon=True,
            )
            probe.start()
            threads.append(probe)
        deadline = time.monotonic() + limit
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            next(t for t in threads if t.is_alive()).join(0.05)
            if on_wait is not None:
                on_wait()
        failed = {}
        for peer in peers:
            out = results.get(peer.session)
            if out is None:
                continue
            if out and out[0] == 0:
                with self._lock:
                    self._reachable.add(peer.session)
                continue
            what = (
                f"answered the probe with code {out[0]}"
                if out
                else f"did not answer a probe within {limit:.1f} s"
            )
            failed[peer.session] = PeerUnreachable(
                f"peer {peer.holder} at {peer.session} {what}: it has died, hangs, or its "
                "manifest is stale. The executor re-plans around it; otherwise check the "
                "holder process and the network between the two hosts.",
                op="probe",
                peer=peer.session,
                holder=peer.holder,
            )
        return failed

    def forget(self, peer: PeerRef) -> None:
        with self._lock:
            self._reachable.discard(peer.session)

    # --- batched synchronous transfers -----------------------------------------------------

    def read_batch(
        self, peer: PeerRef, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]
    ) -> None:
        """Read ``lengths[i]`` bytes at the peer's ``remote[i]`` into local ``local[i]``."""
        self._batch(Op.READ, peer, local, remote, lengths)

    def write_batch(
        self, peer: PeerRef, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]
    ) -> None:
        """Write local ``local[i]`` to the peer's ``remote[i]`` (``lengths[i]`` bytes)."""
        self._batch(Op.WRITE, peer, local, remote, lengths)

    def _batch(self, op: Op, peer: PeerRef, local, remote, lengths) -> None:
        if not (len(local) == len(remote) == len(lengths)):
            raise ValueError("local, remote and lengths must have the same length.")
        if not lengths:
            return
        self.check_reachable(peer)
        fn = (
            self._te.batch_transfer_sync_read
            if op is Op.READ
            else (self._te.batch_transfer_sync_write)
        )
        rc = fn(peer.session, list(local), list(remote), list(lengths))
        if rc != 0:
            self.forget(peer)
            raise TransferFailed(
                f"batch {op.value}",
                peer.session,
                rc,
                f"{len(lengths)} requests, {sum(lengths)} bytes",
                peer.holder,
            )

    # --- asynchronous requests -------------------------------------------------------------

    def submit(self, op: Op, peer: PeerRef, local: int, remote: int, nbytes: int) -> Ticket:
        """Start one request; poll it with :meth:`poll`."""
        self.check_reachable(peer)
        fn = (
            self._te.batch_transfer_async_read
            if op is Op.READ
            else (self._te.batch_transfer_async_write)
        )
        batch_id = fn(peer.session, [local], [remote], [nbytes])
        if not batch_id:
            self.forget(peer)
            raise TransferFailed(
                f"submit {op.value}",
                peer.session,
                -1,
                f"{nbytes} bytes at {remote:#x}",
                peer.holder,
            )
        return Ticket(peer=peer, op=op, nbytes=nbytes, handle=batch_id)

    def submit_many(
        self,
        op: Op,
        peer: PeerRef,
        local: Sequence[int],
        remote: Sequence[int],
        lengths: Sequence[int],
        on_wait: Callable[[], None] | None = None,
    ) -> Ticket:
        """Start several requests to one peer as one batch (``local[i]`` to or from
        ``remote[i]``, ``lengths[i]`` bytes); poll the batch with :meth:`poll`. ``on_wait``:
        called while a first contact is probed (:meth:`check_reachable`)."""
        if not (len(local) == len(remote) == len(lengths)) or not lengths:
            raise ValueError("local, remote and lengths must be equally long and not empty.")
        self.check_reachable(peer, on_wait)
        fn = (
            self._te.batch_transfer_async_read
            if op is Op.READ
            else (self._te.batch_transfer_async_write)
        )
        batch_id = fn(peer.session, list(local), list(remote), list(lengths))
        if not batch_id:
            self.forget(peer)
            raise TransferFailed(
                f"submit {op.value}",
                peer.session,
                -1,
                f"{len(lengths)} requests, {sum(lengths)} bytes",
                peer.holder,
            )
        return Ticket(peer=peer, op=op, nbytes=sum(lengths), handle=batch_id)

    def poll(self, ticket: Ticket) -> Poll:
        """``DONE``, ``PENDING`` or ``FAILED``; a finished ticket is never polled again."""
        if ticket.done:
            return Poll.DONE
        rc = self._te.transfer_check_status(ticket.handle)
        if rc == 1:
            ticket.done = True
            return Poll.DONE
        if rc == 0:
            return Poll.PENDING
        self.forget(ticket.peer)
        return Poll.FAILED

    def close(self) -> None:
        for addr in list(self._registered):
            try:
                self.unregister(addr)
            except EngineError as exc:
                log.warning("closing engine %s: %s", self.session, exc)
        self._te = None


def start_transport(config: TransferConfig):
    """The transport the config names: Mooncake for tcp/rdma/nvlink_intra, CUDA IPC else."""
    if config.protocol == "cuda_ipc":
        from .ipc import IpcTransport

        return IpcTransport.start(config)
    return MooncakeTransport.start(config)


def _ipv4(host: str) -> str | None:
    """``host`` as an IPv4 address (``localhost``: the loopback one), ``None`` if it is none."""
    import ipaddress

    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None
