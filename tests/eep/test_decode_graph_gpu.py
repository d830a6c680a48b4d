"""Decode steps replayed from CUDA graphs on one GPU (run on the lent GPU machine; skipped
elsewhere): a one-slot ``symm`` fabric holds every expert, so the whole MoE layer is the
graph-safe path. Replayed steps must give exactly the tokens of the same padded steps run
eagerly, and the tokens of the plain (unpadded) path; with the number of graphs capped
(``max_graphs``), evicted buckets change nothing but the memory held (``graph_memory``, printed
with ``pytest -s``)."""

from __future__ import annotations

import pytest
import torch

from eep.engine.engine import Engine
from eep.engine.moe_exec import FabricMoE
from eep.engine.sampling import SamplingParams
from eep.engine.sequence import Sequence

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _one_slot(tiny_dir):
    from eep.fabrics.base import FabricConfig
    from eep.fabrics.symm import SymmFabric
    from eep.membership.view import View
    from eep.model import ModelConfig, load_model
    from eep.placement import initial_placement
    from eep.rank.worker import materialised
    from eep.view_state import ViewState

    cfg = ModelConfig.from_dir(str(tiny_dir))
    experts = cfg.num_experts
    placement = initial_placement(experts, 1, experts)
    local = materialised(placement.slot_experts(0), experts)
    model = load_model(str(tiny_dir), local, device="cuda:0", dtype=torch.float32)
    view = ViewState(1, experts, experts, placement.max_replicas, "cuda:0")
    view.apply(View(1, (0,), ((0, 1),), placement=placement.to_json()))
    fcfg = FabricConfig(1, experts, cfg.hidden_size, cfg.num_experts_per_tok, 8, torch.float32, 5.0)
    fabric = SymmFabric(0, fcfg, view.device_view, device="cuda:0")
    fabric.warm_up()
    fabric.apply_view(1, {0: 1})
    return model, fabric, view


@pytest.fixture(scope="module")
def one_slot(tiny_dir):
    model, fabric, view = _one_slot(tiny_dir)
    yield model, fabric, view
    fabric.close()


def _run(model, fabric, view, graphs: bool, capture: bool = True, max_graphs: int = 16):
    engine = Engine(
        model, 64, 8, 8, moe=FabricMoE(fabric, view), decode_graphs=graphs, max_graphs=max_graphs
    )
    if engine.decode is not None:
        engine.decode.capture = capture
    gen = torch.Generator().manual_seed(3)
    for i, (plen, glen) in enumerate([(3, 40), (12, 9), (1, 20), (20, 5), (6, 70)]):
        prompt = torch.randint(0, model.config.vocab_size, (plen,), generator=gen).tolist()
        engine.add(Sequence(f"r{i}", prompt, [], SamplingParams(max_tokens=glen)))
    return engine.run_to_completion(), engine


def test_replayed_decode_steps_equal_eager_ones(one_slot):
    model, fabric, view = one_slot
    replayed, engine = _run(model, fabric, view, graphs=True)
    assert engine.decode.capture and engine.decode.captured >= 3, engine.decode.buckets.keys()
    mem = engine.decode.graph_memory()
    print("uncapped", mem.as_dict())
    assert mem.evictions == 0 and mem.graphs == mem.captures == engine.decode.captured
    assert mem.reserved_bytes > 0 and mem.allocated_bytes > 0, mem
    eager, _ = _run(model, fabric, view, graphs=True, capture=False)
    assert replayed == eager
    plain, _ = _run(model, fabric, view, graphs=False)
    assert replayed == plain


@pytest.mark.parametrize("cap", [2, 1])
def test_capped_graphs_evict_and_still_equal_eager_steps(one_slot, cap):
    """A cap below the buckets the run crosses (>= 3): the least recently replayed graph is
    evicted (reset, its bucket dropped) and the run still gives the eager steps' tokens. Cap 1
    also checks the shared pool is never left without a graph at a capture (the allocator
    asserts use_count > 0 when a capture reuses a pool), since the old graph goes only after
    the new one is captured."""
    model, fabric, view = one_slot
    eager, _ = _run(model, fabric, view, graphs=True, capture=False)
    capped, engine = _run(model, fabric, view, graphs=True, max_graphs=cap)
    runner = engine.decode
    mem = runner.graph_memory()
    print(f"cap {cap}", mem.as_dict())
    assert capped == eager
    assert runner.capture and mem.cap == cap and mem.graphs == len(runner.graphs) <= cap, mem
    assert mem.evictions >= 1 and mem.captures == mem.graphs + mem.evictions, mem
    held = runner.graphs.keys()
    assert set(held) == {k for k, b in runner.buckets.items() if b.graph is not None}
    # the shared pool grew (its first capture takes fresh segments) and the graphs held now
    # keep at least their outputs allocated in it
    assert mem.reserved_bytes > 0, mem
    assert mem.allocated_bytes >= sum(runner.buckets[k].logits.nbytes for k in held) > 0, mem
