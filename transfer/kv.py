"""KV migration: a request's KV blocks moved from one rank's KV arena to another's, verified.

The owner of the request pushes: it checksums its blocks where they live, writes them into
the blocks the receiver reserved (one batched write, contiguous runs coalesced) and hands the
receiver a :class:`KVRecord` (through the front-end's control message); the receiver checks its
blocks against the record before it uses them. :func:`pull_kv_blocks` is the same move
started by the receiver, given the record of the blocks' checksums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .arena import Arena
from .checksum import checksums
from .engine import PeerRef, Region
from .errors import ChecksumMismatch, LayoutMismatch


@dataclass(frozen=True, slots=True)
class KVRecord:
    """Blocks ``dst_blocks`` of ``dst_holder`` now hold a request's KV; ``checksums[i]`` is
    the checksum of block ``dst_blocks[i]``."""

    src_holder: str
    dst_holder: str
    dst_blocks: tuple[int, ...]
    checksums: tuple[str, ...]
    block_nbytes: int


def _check_region(arena: Arena, region: Region, blocks: Sequence[int], peer: str) -> None:
    if region.block_nbytes != arena.block_nbytes:
        raise LayoutMismatch(
            f"KV arena {region.name!r} of {peer} has {region.block_nbytes}-byte blocks, the "
            f"local one {arena.block_nbytes}-byte blocks: both ranks must use one KV config."
        )
    n = region.nbytes // region.block_nbytes
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        raise IndexError(f"KV blocks {bad} outside [0, {n}) of {peer}'s {region.name!r}.")


def _runs(local: Sequence[int], remote: Sequence[int]) -> list[tuple[int, int, int]]:
    """Coalesce block pairs into ``(local_first, remote_first, count)`` runs."""
    runs: list[list[int]] = []
    for lb, rb in zip(local, remote, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == lb and runs[-1][1] + runs[-1][2] == rb:
            runs[-1][2] += 1
        else:
            runs.append([lb, rb, 1])
    return [tuple(r) for r in runs]


def _move(
    transport,
    arena: Arena,
    peer: PeerRef,
    region_name: str,
    local_blocks,
    remote_blocks,
    write: bool,
) -> None:
    if len(local_blocks) != len(remote_blocks):
        raise ValueError("source and destination block lists differ in length.")
    region = peer.region(region_name)
    _check_region(arena, region, remote_blocks, peer.holder)
    for b in local_blocks:
        arena.block(b)  # bounds check
    bn = arena.block_nbytes
    runs = _runs(local_blocks, remote_blocks)
    local = [arena.addr + lb * bn for lb, _, _ in runs]
    remote = [region.addr + rb * bn for _, rb, _ in runs]
    lengths = [c * bn for _, _, c in runs]
    fn = transport.write_batch if write else transport.read_batch
    fn(peer, local, remote, lengths)


def block_checksums(arena: Arena, blocks: Sequence[int]) -> tuple[str, ...]:
    """Checksums of KV blocks, computed where they live (one host sync)."""
    return tuple(checksums([arena.block(b) for b in blocks]))


def push_kv_blocks(
    transport,
    arena: Arena,
    src_blocks: Sequence[int],
    peer: PeerRef,
    region_name: str,
    dst_blocks: Sequence[int],
    src_holder: str = "",
) -> KVRecord:
    """Write local ``src_blocks`` into ``dst_blocks`` of the peer's KV region."""
    sums = block_checksums(arena, src_blocks)
    _move(transport, arena, peer, region_name, src_blocks, dst_blocks, write=True)
    return KVRecord(src_holder, peer.holder, tuple(dst_blocks), sums, arena.block_nbytes)


def pull_kv_blocks(
    transport,
    arena: Arena,
    dst_blocks: Sequence[int],
    peer: PeerRef,
    region_name: str,
    src_blocks: Sequence[int],
    expected: Sequence[str],
    dst_holder: str = "",
) -> KVRecord:
    """Read the peer's ``src_blocks`` into local ``dst_blocks`` and verify them."""
    _move(transport, arena, peer, region_name, dst_blocks, src_blocks, write=False)
    record = KVRecord(
        peer.holder, dst_holder, tuple(dst_blocks), tuple(expected), arena.block_nbytes
    )
    verify_kv_blocks(arena, record)
    return record


def verify_kv_blocks(arena: Arena, record: KVRecord) -> None:
    """Raise :class:`ChecksumMismatch` unless every block matches the record."""
    if record.block_nbytes != arena.block_nbytes:
        raise LayoutMismatch(
            f"KV record has {record.block_nbytes}-byte blocks, the arena "
            f"{arena.block_nbytes}-byte blocks."
        )
    actual = block_checksums(arena, record.dst_blocks)
    for b, want, got in zip(record.dst_blocks, record.checksums, actual, strict=True):
        if want != got:
            raise ChecksumMismatch(f"kv block {b}", record.src_holder or "the sender", want, got)
