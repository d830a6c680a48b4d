"""The cap on captured decode graphs (``RuntimeConfig.max_cuda_graphs``): the LRU policy
(:class:`GraphCache`, pure) and the runner's eviction path, driven on the CPU by a runner whose
"graph" re-runs the bucket's forward into its static output on replay (the real capture needs a
GPU: ``test_decode_graph_gpu.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from eep.config import DEFAULT_MAX_CUDA_GRAPHS, RuntimeConfig
from eep.engine.decode_graph import MAX_RECAPTURE_WAIT, DecodeRunner, GraphCache, GraphMemory
from eep.engine.engine import Engine
from eep.engine.sampling import SamplingParams
from eep.engine.sequence import Sequence
from eep.model import load_model

# --- GraphCache ------------------------------------------------------------------------------


def test_the_least_recently_replayed_is_the_victim_once_full():
    cache = GraphCache(2)
    assert cache.victim() is None
    cache.add("a")
    assert cache.victim() is None
    cache.add("b")
    assert cache.victim() == "a" and cache.keys() == ["a", "b"]
    cache.touch("a")  # replayed: b is now the least recent
    assert cache.victim() == "b" and cache.keys() == ["b", "a"]
    cache.evict("b")
    assert len(cache) == 1 and "b" not in cache and "a" in cache and cache.evictions == 1
    assert cache.victim() is None
    cache.add("c")
    assert cache.victim() == "a"
    with pytest.raises(ValueError, match="cannot add 'd'"):
        cache.add("d")  # full: the caller evicts first
    roomy = GraphCache(3)
    roomy.add("a")
    with pytest.raises(ValueError, match="cannot add 'a'"):
        roomy.add("a")  # held already


def test_a_cap_below_one_is_refused():
    for cap in (0, -1):
        with pytest.raises(ValueError, match="cap must be >= 1"):
            GraphCache(cap)


def test_an_evicted_key_waits_longer_each_time_to_be_captured_again():
    cache = GraphCache(1)
    assert cache.wait("a") == 1 and cache.wants("a", 1) and not cache.wants("a", 0)
    cache.add("a")
    assert not cache.wants("a", 100)  # held already
    waits = []
    for _ in range(12):
        cache.evict("a")
        waits.append(cache.wait("a"))
        assert not cache.wants("a", waits[-1] - 1) and cache.wants("a", waits[-1])
        cache.add("a")
    assert waits[:4] == [2, 4, 8, 16] and max(waits) == waits[-1] == MAX_RECAPTURE_WAIT
    assert cache.wait("b") == 1 and cache.evictions == 12  # per key


def test_touching_a_key_not_held_is_an_error():
    with pytest.raises(KeyError):
        GraphCache(2).touch("nope")


# --- the config option -----------------------------------------------------------------------


def _cfg(**over) -> RuntimeConfig:
    return RuntimeConfig.for_cluster("c", "m", 2, experts_per_slot=4, **over)


def test_max_cuda_graphs_defaults_round_trips_and_is_checked():
    assert _cfg().max_cuda_graphs == DEFAULT_MAX_CUDA_GRAPHS == 16
    cfg = _cfg(device="cuda", max_cuda_graphs=3)
    assert RuntimeConfig.from_json(cfg.to_json()) == cfg and cfg.max_cuda_graphs == 3
    assert _cfg(max_cuda_graphs=None).max_cuda_graphs == DEFAULT_MAX_CUDA_GRAPHS
    for bad in (0, -2):
        with pytest.raises(ValueError, match=r"RuntimeConfig\.max_cuda_graphs must be >= 1"):
            _cfg(max_cuda_graphs=bad)
    # a config written before the option existed still reads, with the default
    older = json.loads(cfg.to_json())
    del older["max_cuda_graphs"]
    assert RuntimeConfig.from_json(json.dumps(older)).max_cuda_graphs == DEFAULT_MAX_CUDA_GRAPHS


# --- the runner's eviction path, on the CPU --------------------------------------------------


class _FakeGraph:
    """Stands for a captured graph: replay re-runs the bucket's forward into the static
    output, which is what replaying a real graph does."""

    def __init__(self, runner: _FakeCaptureRunner, bucket, logits: torch.Tensor):
        self.runner, self.bucket, self.logits, self.alive = runner, bucket, logits, True

    def replay(self) -> None:
        assert self.alive, "replayed an evicted graph"
        with torch.inference_mode():
            self.logits.copy_(self.runner._forward(self.bucket))

    def reset(self) -> None:
        assert self.alive
        self.alive = False
        self.runner.live.discard(self)


class _FakeCaptureRunner(DecodeRunner):
    """Captures on the CPU: fake graphs, and a fake allocator where a graph's output counts
    as allocated and the pool (reserved) only grows, as a shared pool does."""

    def __init__(self, engine, max_graphs: int):
        super().__init__(engine, capture=True, max_graphs=max_graphs)
        self.live: set[_FakeGraph] = set()
        self.live_at_capture: list[int] = []  # graphs alive in the pool as each capture begins
        self.settled = 0
        self.fake_reserved = self.fake_allocated = 0

    def _settle(self) -> None:
        self.settled += 1

    def _memory(self) -> tuple[int, int]:
        self.fake_allocated = sum(g.logits.nbytes for g in self.live)
        return self.fake_reserved, self.fake_allocated

    def _record(self, bucket):
        self.live_at_capture.append(len(self.live))
        with torch.inference_mode():
            logits = self._forward(bucket)
        self.fake_reserved += 2 * logits.nbytes
        graph = _FakeGraph(self, bucket, logits)
        self.live.add(graph)
        return graph, logits


def _requests(vocab: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(11)
    out = []
    # the batch shrinks as requests end: rows 8, 4, 2, 1 and contexts 64, 128, 256
    for i, (plen, gen_len) in enumerate(
        [(3, 140), (17, 9), (1, 30), (40, 5), (9, 100), (5, 60), (2, 12), (30, 20)]
    ):
        prompt = torch.randint(0, vocab, (plen,), generator=gen).tolist()
        out.append(Sequence(f"r{i}", prompt, [], SamplingParams(max_tokens=gen_len)))
    return out


def _run(model, max_graphs: int | None) -> tuple[dict[str, list[int]], Engine]:
    """``max_graphs`` None: the plain (unpadded) path."""
    engine = Engine(model, kv_blocks=96, block_size=8, max_tokens_per_step=8)
    if max_graphs is not None:
        engine.decode = _FakeCaptureRunner(engine, max_graphs)
    for seq in _requests(model.config.vocab_size):
        engine.add(seq)
    return engine.run_to_completion(), engine


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def plain(model):
    return _run(model, None)[0]


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_capped_runs_evict_and_give_the_plain_paths_tokens(model, plain, cap):
    got, engine = _run(model, cap)
    assert got == plain
    runner = engine.decode
    mem = runner.graph_memory()
    assert isinstance(mem, GraphMemory) and mem.cap == cap
    assert mem.evictions >= 1 and mem.graphs == len(runner.graphs) <= cap
    assert mem.captures == mem.graphs + mem.evictions == runner.captured
    # every held graph's bucket is live, and nothing but held buckets holds a graph
    held = set(runner.graphs.keys())
    assert held == {k for k, b in runner.buckets.items() if b.graph is not None}
    assert all(g.alive for g in (runner.buckets[k].graph for k in held))
    assert len(runner.live) == mem.graphs
    # the memory: outputs of the graphs held now; the pool grew with every capture
    assert mem.allocated_bytes == sum(runner.buckets[k].logits.nbytes for k in held) > 0
    assert mem.reserved_bytes == runner.fake_reserved > 0
    assert mem.as_dict() == {
        "graphs": mem.graphs,
        "cap": cap,
        "captures": mem.captures,
        "evictions": mem.evictions,
        "reserved_bytes": mem.reserved_bytes,
        "allocated_bytes": mem.allocated_bytes,
    }
    assert runner.settled == mem.captures  # one device sync per capture, none per replay
    # the shared pool always keeps a live graph: a capture after the first finds one there
    # (with a cap of 1 the old graph is evicted only after the new one is captured)
    assert runner.live_at_capture[0] == 0 and min(runner.live_at_capture[1:]) >= 1
    assert max(runner.live_at_capture) <= max(cap - 1, 1)
    assert engine.kv.free_blocks == engine.kv.cfg.num_blocks - 1  # only the scratch block


def test_a_cap_above_the_working_set_never_evicts(model, plain):
    got, engine = _run(model, 64)
    assert got == plain
    mem = engine.decode.graph_memory()
    assert mem.evictions == 0 and mem.graphs == mem.captures == len(engine.decode.buckets) >= 4


def test_the_runner_with_capture_off_captures_nothing(model, plain):
    engine = Engine(model, kv_blocks=96, block_size=8, max_tokens_per_step=8)
    engine.decode = DecodeRunner(engine, capture=False, max_graphs=1)
    for seq in _requests(model.config.vocab_size):
        engine.add(seq)
    assert engine.run_to_completion() == plain
    mem = engine.decode.graph_memory()
    assert (mem.graphs, mem.captures, mem.evictions) == (0, 0, 0)
    assert (mem.reserved_bytes, mem.allocated_bytes) == (0, 0)
    assert len(engine.decode.buckets) >= 4


def test_the_engine_passes_its_cap_to_the_runner(model):
    engine = Engine(model, kv_blocks=16, block_size=8, decode_graphs=True, max_graphs=5)
    assert engine.decode.graphs.cap == 5 and not engine.decode.capture
    assert Engine(model, kv_blocks=16, block_size=8, decode_graphs=True).decode.graphs.cap == 16


def _waves(model, max_graphs: int | None) -> tuple[list[dict[str, list[int]]], Engine]:
    """Waves of 4, 1, 4, 1, 4 requests run one after another: the decode buckets (4, 64) and
    (1, 64) alternate (with a step of (2, 64) as a wave of 4 ends), so buckets come back after
    they were evicted."""
    engine = Engine(model, kv_blocks=64, block_size=8, max_tokens_per_step=8)
    if max_graphs is not None:
        engine.decode = _FakeCaptureRunner(engine, max_graphs)
    gen = torch.Generator().manual_seed(7)
    outs = []
    for w, size in enumerate([4, 1, 4, 1, 4]):
        for i in range(size):
            prompt = torch.randint(0, model.config.vocab_size, (2 + i,), generator=gen).tolist()
            engine.add(Sequence(f"w{w}r{i}", prompt, [], SamplingParams(max_tokens=12)))
        outs.append(engine.run_to_completion())
    return outs, engine


def test_an_evicted_bucket_that_comes_back_is_captured_again_after_its_wait(model):
    want, _ = _waves(model, None)
    got, engine = _waves(model, 1)
    assert got == want
    runner = engine.decode
    mem = runner.graph_memory()
    assert mem.graphs == 1 and mem.captures == 1 + mem.evictions
    # both alternating buckets were evicted at least twice, so captured again after eviction
    assert runner.graphs.wait((4, 64)) >= 4 and runner.graphs.wait((1, 64)) >= 4
    (held,) = runner.graphs.keys()
    assert mem.allocated_bytes == runner.buckets[held].logits.nbytes
    assert set(runner.buckets) >= {held} and all(
        b.graph is None for k, b in runner.buckets.items() if k != held
    )
    # a cap that holds every bucket: each captured once, replayed from then on
    got, engine = _waves(model, 3)
    assert got == want
    mem = engine.decode.graph_memory()
    assert mem.evictions == 0 and mem.graphs == mem.captures == len(engine.decode.buckets) == 3
