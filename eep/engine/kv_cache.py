"""A paged KV cache in one arena tensor.

The arena is ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` (K then V):
block-major, so one block holds every layer's K and V of its positions contiguously and a
request's KV moves to another rank as a handful of block copies (the transfer service
registers the arena once). A request owns a block table (a list of block ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVCacheFull(RuntimeError):
    """No free blocks: the scheduler must wait for requests to finish."""


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int = 256
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVCacheConfig.{name} must be >= 1, got {getattr(self, name)}.")


@dataclass
class BlockTable:
    blocks: list[int] = field(default_factory=list)


class KVCache:
    """``buffer``: optional uint8 storage to build the arena in (a registered transfer arena
    of ``num_blocks`` blocks of :meth:`block_nbytes`)."""

    def __init__(
        self,
        cfg: KVCacheConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        buffer: torch.Tensor | None = None,
    ):
        self.cfg = cfg
        shape = (cfg.num_blocks, cfg.num_layers, 2, cfg.block_size, cfg.num_kv_heads, cfg.head_dim)
        if buffer is None:
            self.arena = torch.zeros(shape, dtype=dtype, device=device)
        else:
            self.arena = buffer.view(dtype).view(shape)
            self.arena.zero_()
        self._free = list(range(cfg.num_blocks - 1, -1, -1))
        self.scratch_blocks = 0  # taken out of circulation for good (reserve_scratch)

    @staticmethod
    def block_nbytes(cfg: KVCacheConfig, dtype: torch.dtype) -> int:
        per = cfg.num_layers * 2 * cfg.block_size * cfg.num_kv_heads * cfg.head_dim
        return per * dtype.itemsize

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.block_size)

    def reserve_scratch(self) -> int:
        """Takes one block out of circulation for good and returns it: the padded rows of
        static decode steps write and read there (``eep.engine.decode_graph``)."""
        if not self._free:
            raise KVCacheFull("no block left for the decode scratch block")
        self.scratch_blocks += 1
        return self._free.pop()

    @property
    def capacity_tokens(self) -> int:
        """The most positions one sequence can ever hold: every block but the scratch ones."""
        return (self.cfg.num_blocks - self.scratch_blocks) * self.cfg.block_size

    def reserve(self, table: BlockTable, num_tokens: int) -> None:
        """Grow ``table`` to hold ``num_tokens`` positions."""
        need = self.blocks_for(num_tokens) - len(table.blocks)
        if need > len(self._free):
            raise KVCacheFull(f"need {need} blocks, {len(self._free)} free")
        for _ in range(max(0, need)):
            table.blocks.append(self._free.pop())

    def release(self, table: BlockTable) -> None:
        self._free.extend(reversed(table.blocks))
        table.blocks.clear()
