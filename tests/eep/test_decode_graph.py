"""Decode steps on static, padded buffers (``Engine(decode_graphs=True)``) give the tokens
and logits of the plain path; on the CPU nothing is captured, the padded path itself runs."""

from __future__ import annotations

import pytest
import torch

from eep.engine.attention import BatchAttention
from eep.engine.engine import Engine
from eep.engine.kv_cache import BlockTable, KVCache, KVCacheConfig
from eep.engine.sampling import SamplingParams
from eep.engine.sequence import Sequence
from eep.model import load_model


def _requests(vocab: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(5)
    out = []
    # different prompt lengths and budgets: the decoding batch shrinks as requests end,
    # crossing the 4, 2 and 1 row buckets and the 64 and 128 position context buckets
    for i, (plen, gen_len) in enumerate([(3, 70), (17, 9), (1, 30), (40, 5), (9, 100)]):
        prompt = torch.randint(0, vocab, (plen,), generator=gen).tolist()
        out.append(Sequence(f"r{i}", prompt, [], SamplingParams(max_tokens=gen_len)))
    return out


def _run(model, decode_graphs: bool) -> tuple[dict[str, list[int]], Engine]:
    engine = Engine(
        model, kv_blocks=64, block_size=8, max_tokens_per_step=8, decode_graphs=decode_graphs
    )
    for seq in _requests(model.config.vocab_size):
        engine.add(seq)
    return engine.run_to_completion(), engine


def test_padded_decode_steps_give_the_plain_paths_tokens(tiny_dir):
    model = load_model(tiny_dir, dtype=torch.float64)
    want, _ = _run(model, decode_graphs=False)
    got, engine = _run(model, decode_graphs=True)
    assert got == want
    runner = engine.decode
    assert runner is not None and not runner.capture and runner.captured == 0
    mem = runner.graph_memory()  # nothing captured, so nothing held, evicted or measured
    assert (mem.graphs, mem.captures, mem.evictions) == (0, 0, 0) and mem.cap == 16
    assert (mem.reserved_bytes, mem.allocated_bytes) == (0, 0)
    rows = {r for r, _ in runner.buckets}
    contexts = {c for _, c in runner.buckets}
    assert rows >= {1, 2, 4} and contexts >= {64, 128}, runner.buckets.keys()
    # the scratch block never went to a request, and every request's blocks came back
    assert engine.kv.free_blocks == engine.kv.cfg.num_blocks - 1


def test_the_decode_plan_equals_the_general_plan_on_real_rows():
    gen = torch.Generator().manual_seed(1)
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=2, head_dim=4, num_blocks=16, block_size=4)
    kv = KVCache(cfg, torch.float64, "cpu")
    kv.arena.copy_(torch.randn(kv.arena.shape, generator=gen, dtype=torch.float64))
    scratch = kv.reserve_scratch()
    starts = [6, 0, 11]
    tables = []
    for start in starts:
        t = BlockTable()
        kv.reserve(t, start + 1)
        tables.append(t.blocks)
    q = torch.randn(4, 4, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(4, 2, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(4, 2, 4, generator=gen, dtype=torch.float64)
    # three real rows and one padded row, context padded to 16 positions (4 blocks)
    table = torch.full((4, 4), scratch, dtype=torch.long)
    for i, blocks in enumerate(tables):
        table[i, : len(blocks)] = torch.tensor(blocks)
    positions = torch.tensor(starts + [0])
    before = kv.arena.clone()
    arena = kv.arena.clone()
    got = BatchAttention.decode(table, positions, 4)(arena, 0, q, k, v)
    plain = BatchAttention(tables, starts, [1, 1, 1], 4, "cpu")
    want = plain(kv.arena, 0, q[:3], k[:3], v[:3])
    torch.testing.assert_close(got[:3], want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got[3]).all()
    # the real rows' K/V landed where the plain plan put them; the padded row in the scratch block
    touched = (arena != before).flatten(1).any(1).nonzero().view(-1).tolist()
    assert set(touched) == {t[s // 4] for t, s in zip(tables, starts, strict=True)} | {scratch}


def test_a_request_that_can_never_fit_is_refused_not_queued(tiny_dir):
    """With padded decode steps one block is scratch: a request that needs every block would
    wait forever at the head of the queue, so the engine refuses it at once, and the config's
    rank_kv_tokens (what the front-end admits) is the same number."""
    from eep.config import RuntimeConfig

    model = load_model(tiny_dir, dtype=torch.float64)
    for graphs in (False, True):
        engine = Engine(model, kv_blocks=8, block_size=4, decode_graphs=graphs)
        cfg = RuntimeConfig("c", tiny_dir, 1, 1, kv_blocks=8, block_size=4, cuda_graphs=graphs)
        assert engine.max_model_len == cfg.rank_kv_tokens == (8 - graphs) * 4
        too_long = Sequence("big", [1] * 4, [], SamplingParams(max_tokens=(8 - graphs) * 4 - 3))
        with pytest.raises(ValueError, match=rf"holds for one request \({cfg.rank_kv_tokens} "):
            engine.add(too_long)
        fits = Sequence("ok", [1] * 4, [], SamplingParams(max_tokens=(8 - graphs) * 4 - 4))
        engine.add(fits)
        assert engine.run_to_completion()["ok"] and len(engine.scheduler.waiting) == 0
