"""Batched attention over the paged cache equals attention of each request alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eep.engine.attention import BatchAttention
from eep.engine.kv_cache import BlockTable, KVCache, KVCacheConfig


def _slots(kv: KVCache, table: BlockTable, positions: torch.Tensor):
    blocks = torch.tensor(table.blocks, dtype=torch.long)
    return blocks[positions // kv.cfg.block_size], positions % kv.cfg.block_size


def _write(kv: KVCache, layer: int, table: BlockTable, positions, k, v) -> None:
    block, offset = _slots(kv, table, positions)
    kv.arena[block, layer, 0, offset] = k
    kv.arena[block, layer, 1, offset] = v


def _read(kv: KVCache, layer: int, table: BlockTable, length: int):
    block, offset = _slots(kv, table, torch.arange(length))
    return kv.arena[block, layer, 0, offset], kv.arena[block, layer, 1, offset]


def attend(q, k, v, start: int) -> torch.Tensor:
    """One request alone: ``q`` ``[n, H_q, D]`` at positions ``start ..``, ``k``/``v``
    ``[start + n, H_kv, D]`` -> ``[n, H_q * D]``; query ``i`` sees keys ``0 .. start + i``."""
    n, heads, dim = q.shape
    groups = heads // k.shape[1]
    kk = k.repeat_interleave(groups, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(groups, dim=1).transpose(0, 1)
    qpos = torch.arange(start, start + n)[:, None]
    mask = torch.arange(k.shape[0])[None, :] <= qpos
    out = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)
    return out.transpose(0, 1).reshape(n, heads * dim)


def test_a_mixed_batch_equals_each_request_attended_alone():
    gen = torch.Generator().manual_seed(0)
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=32, block_size=4)
    kv = KVCache(cfg, torch.float64, "cpu")
    heads = 4
    # (tokens already cached, tokens computed in this step): decodes, a chunk, a fresh prefill
    shapes = [(9, 1), (0, 7), (5, 3), (14, 1)]
    tables = []
    for cached, new in shapes:
        table = BlockTable()
        kv.reserve(table, cached + new)
        tables.append(table)
        for layer in range(cfg.num_layers):  # the context already in the cache
            pos = torch.arange(cached)
            k, v = (torch.randn(cached, 2, 8, generator=gen, dtype=torch.float64) for _ in "kv")
            _write(kv, layer, table, pos, k, v)
    total = sum(n for _, n in shapes)
    plan = BatchAttention(
        [t.blocks for t in tables], [c for c, _ in shapes], [n for _, n in shapes], 4, "cpu"
    )
    for layer in range(cfg.num_layers):
        q = torch.randn(total, heads, 8, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(total, 2, 8, generator=gen, dtype=torch.float64) for _ in "kv")
        got = plan(kv.arena, layer, q, k, v)
        at = 0
        for (cached, new), table in zip(shapes, tables, strict=True):
            rows = slice(at, at + new)
            keys, values = _read(kv, layer, table, cached + new)  # holds this step's K/V now
            assert torch.equal(keys[cached:], k[rows]) and torch.equal(values[cached:], v[rows])
            want = attend(q[rows], keys, values, cached)
            torch.testing.assert_close(got[rows], want, rtol=1e-12, atol=1e-12)
            at += new
