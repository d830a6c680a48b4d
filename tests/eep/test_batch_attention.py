"""Batched attention over the paged cache equals attention of each request alone."""

from __future__ import annotations

import torch

from eep.engine.attention import BatchAttention, attend
from eep.engine.kv_cache import BlockTable, KVCache, KVCacheConfig


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
            kv.write(layer, table, pos, k, v)
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
            keys, values = kv.read(layer, table, cached + new)  # holds this step's K/V now
            assert torch.equal(keys[cached:], k[rows]) and torch.equal(values[cached:], v[rows])
            want = attend(q[rows], keys, values, cached)
            torch.testing.assert_close(got[rows], want, rtol=1e-12, atol=1e-12)
            at += new
