"""torchrun with its TCP stores listening only on the address they are reached at.

``python -m eep.torchrun ARGS`` is ``torchrun ARGS`` (``torch.distributed.run``) with one
change. A ``torch.distributed.TCPStore`` server listens on every interface whatever host it is
given: its C++ server binds the wildcard address (checked on torch 2.13, ``ss -ltnp``: ``*:port``
for each store of an agent). A torchrun agent hosts two: the c10d rendezvous store at
``--rdzv-endpoint`` (``localhost:0`` with ``--standalone``) and the store it shares with its
workers at ``--local-addr``. Here :class:`BoundTCPStore` takes ``TCPStore``'s place: a server
store is handed a socket already bound to the host it was given (``master_listen_fd``), so it
listens there alone. The launcher runs every agent this way with ``--local-addr 127.0.0.1``;
the nccl fabric's store (slot 0 hosts it) uses the same class.
"""

from __future__ import annotations

import errno
import socket
import sys
from datetime import timedelta

import torch.distributed as dist


def bound_listener(host: str, port: int) -> int:
    """The file descriptor of a TCP socket listening on ``host:port`` (``port`` 0: a free one);
    the caller owns it. Tries each address ``host`` resolves to; the last error otherwise."""
    error: OSError | None = None
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock.detach()
    raise error or OSError(errno.EADDRNOTAVAIL, f"{host!r} resolves to no address")


class BoundTCPStore(dist.TCPStore):
    """``torch.distributed.TCPStore`` whose server (``is_master``) listens on ``host_name``
    only. A client store, or a server given its own ``master_listen_fd``, is unchanged."""

    def __init__(
        self,
        host_name: str,
        port: int,
        world_size: int | None = None,
        is_master: bool = False,
        timeout: timedelta = timedelta(seconds=300),
        wait_for_workers: bool = True,
        multi_tenant: bool = False,
        master_listen_fd: int | None = None,
        use_libuv: bool = True,
    ):
        if is_master and master_listen_fd is None:
            try:
                master_listen_fd = bound_listener(host_name, port)
            except OSError as exc:
                # in use: a multi-tenant store of this process may already serve the port,
                # which torch reuses (and binds nothing); anything else fails as torch would
                if not (multi_tenant and exc.errno == errno.EADDRINUSE):
                    raise RuntimeError(
                        f"the TCP store cannot listen on {host_name}:{port}: {exc}"
                    ) from exc
        super().__init__(
            host_name,
            port,
            world_size,
            is_master,
            timeout,
            wait_for_workers,
            multi_tenant,
            master_listen_fd,
            use_libuv,
        )


def _use_bound_stores() -> None:
    """Put :class:`BoundTCPStore` wherever torch's launcher and rendezvous name TCPStore."""
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401
    import torch.distributed.elastic.rendezvous.static_tcp_rendezvous  # noqa: F401
    import torch.distributed.run  # noqa: F401

    original = BoundTCPStore.__base__
    for name, module in list(sys.modules.items()):
        if name.startswith("torch.distributed") and getattr(module, "TCPStore", None) is original:
            module.TCPStore = BoundTCPStore


def main() -> None:
    _use_bound_stores()
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    main()
