"""A process that holds arenas and serves them to peers: the holders of the transfer tests and of
``eep bench transfer`` (no runtime process uses it; a serving rank publishes its own arenas).

:func:`serve` runs in a child process (``multiprocessing`` spawn): it allocates the weight arena
(and optionally a KV arena), fills it with a per-tensor pattern (:func:`fill_pattern`),
registers with a transport, publishes its manifest, reports ``ready`` and then answers
commands on its pipe until told to stop, its pipe closes, or ``lifetime_s`` passes.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from eep.transfer.arena import Arena, ArenaLayout
from eep.transfer.checksum import checksums
from eep.transfer.config import TransferConfig

log = logging.getLogger(__name__)


def fill_pattern(data: torch.Tensor, name: str) -> None:
    """Fill ``[n]`` uint8 ``data`` with bytes that depend on ``name`` and position only."""
    seed = zlib.crc32(name.encode()) & 0x7FFFFFFF
    n_words = data.numel() // 4
    if n_words:
        w = torch.arange(n_words, dtype=torch.int32, device=data.device)
        w.mul_(-1640531535).add_(seed)  # 2654435761 as int32; wraps
        w.bitwise_xor_(w >> 15)
        data[: n_words * 4].view(torch.int32).copy_(w)
    if data.numel() % 4:
        data[n_words * 4 :].fill_(seed & 0xFF)


def fill_arena(arena: Arena) -> None:
    for s in arena.layout.specs:
        fill_pattern(arena.bytes_of(s), s.name)


@dataclass(frozen=True)
class SourceSpec:
    """Everything a holder process needs; picklable."""

    etcd: str
    cluster: str
    holder: str
    config: TransferConfig
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]
    device: str = "cpu"
    kv_blocks: int = 0
    kv_block_nbytes: int = 0
    corrupt: tuple[str, ...] = ()
    lifetime_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)


def serve(spec: SourceSpec, conn) -> None:
    """The holder process's main (see the module docstring)."""
    os.environ.update(spec.env)
    from eep.membership.etcd import EtcdClient
    from eep.transfer.engine import start_transport
    from eep.transfer.manifest import ManifestStore, build_manifest

    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))
    transport = start_transport(spec.config)
    arena = Arena("experts", ArenaLayout.pack(spec.tensors), spec.device)
    fill_arena(arena)
    arenas = [arena]
    kv = None
    if spec.kv_blocks:
        kv = Arena.for_kv("kv", spec.kv_blocks, spec.kv_block_nbytes, spec.device)
        kv.buffer.zero_()
        arenas.append(kv)
    for a in arenas:
        a.register(transport)
    sums = dict(
        zip(
            arena.layout.names,
            checksums([arena.bytes_of(s) for s in arena.layout.specs]),
            strict=True,
        )
    )
    etcd = EtcdClient(spec.etcd)
    store = ManifestStore(etcd, spec.cluster)
    manifest = build_manifest(
        spec.holder,
        transport,
        arenas,
        sums,
        spec.config.host_id,
        slot=int(spec.holder) if spec.holder.isdigit() else None,
        pid=os.getpid(),
    )
    store.publish(manifest)
    for name in spec.corrupt:  # bit rot after publishing: the manifest keeps the good checksum
        arena.bytes_of(arena.layout[name])[:64].bitwise_not_()
    if spec.device.startswith("cuda"):
        torch.cuda.synchronize()
    conn.send(("ready", os.getpid(), transport.session))
    _answer(conn, spec, transport, arena, kv, store)


def _answer(conn, spec: SourceSpec, transport, arena: Arena, kv: Arena | None, store) -> None:
    from eep.transfer.kv import block_checksums, push_kv_blocks, verify_kv_blocks

    while conn.poll(spec.lifetime_s):
        try:
            cmd, *args = conn.recv()
        except EOFError:
            return
        if cmd == "stop":
            conn.send(("ok",))
            return
        try:
            if cmd == "kv_fill":  # (blocks, tag): fill blocks with a pattern
                for b in args[0]:
                    fill_pattern(kv.block(b), f"{args[1]}/{b}")
                conn.send(("ok", block_checksums(kv, args[0])))
            elif cmd == "kv_push":  # (dst holder, src blocks, dst blocks)
                peer = store.get(args[0]).peer
                conn.send(
                    (
                        "ok",
                        push_kv_blocks(
                            transport, kv, args[1], peer, "kv", args[2], src_holder=spec.holder
                        ),
                    )
                )
            elif cmd == "kv_verify":  # (record)
                verify_kv_blocks(kv, args[0])
                conn.send(("ok", block_checksums(kv, args[0].dst_blocks)))
            elif cmd == "kv_bytes":  # (blocks) -> raw bytes, for byte-identity checks
                conn.send(("ok", [bytes(kv.block(b).cpu().numpy()) for b in args[0]]))
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception as exc:  # reported to the parent, which owns the test's verdict
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def spec_tensors(
    num: int, nbytes: int, prefix: str = "experts"
) -> Sequence[tuple[str, str, tuple[int, ...]]]:
    """``num`` bf16 tensors of about ``nbytes`` each (rows of 1024 elements)."""
    rows = max(1, nbytes // 2048)
    return tuple((f"{prefix}.{i}.w", "bfloat16", (rows, 1024)) for i in range(num))
