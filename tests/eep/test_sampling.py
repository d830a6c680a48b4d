"""Sampling (eep.engine.sampling): a draw depends only on the request's seed and the token's
position, so a request re-queued onto another rank, in another batch, with the tokens it
already emitted, continues exactly as it would have; temperature, top_k and top_p shape the
distribution it draws from."""

from __future__ import annotations

import torch

from eep.engine.engine import Engine
from eep.engine.sampling import SamplingParams, sample
from eep.engine.sequence import Sequence
from eep.model import load_model


def _logits(seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_a_draw_depends_only_on_seed_and_position():
    params = SamplingParams(temperature=1.0, seed=7)
    logits = _logits()
    first = [sample(logits, params, i) for i in range(40)]
    torch.manual_seed(123)  # the global generator plays no part
    torch.rand(1000)
    again = [sample(logits, params, i) for i in reversed(range(40))][::-1]
    assert first == again
    other_seed = [sample(logits, SamplingParams(temperature=1.0, seed=8), i) for i in range(40)]
    assert other_seed != first
    assert len(set(first)) > 5  # it does sample


def test_greedy_top_k_1_and_a_tiny_top_p_take_the_most_likely_token():
    logits = _logits(1)
    best = int(torch.argmax(logits))
    for i in range(20):
        assert sample(logits, SamplingParams(), i) == best
        assert sample(logits, SamplingParams(temperature=1.5, top_k=1, seed=i), i) == best
        assert sample(logits, SamplingParams(temperature=1.5, top_p=1e-9, seed=i), i) == best


def test_top_k_and_top_p_keep_draws_inside_their_head():
    logits = _logits(2)
    order = torch.argsort(logits, descending=True).tolist()
    probs = torch.softmax(logits.double(), -1)[order]
    nucleus = int((torch.cumsum(probs, 0) - probs < 0.5).sum())
    top_k = {
        sample(logits, SamplingParams(temperature=1.0, top_k=3, seed=s), 0) for s in range(300)
    }
    assert top_k == set(order[:3])
    top_p = {
        sample(logits, SamplingParams(temperature=1.0, top_p=0.5, seed=s), 0) for s in range(300)
    }
    assert top_p <= set(order[:nucleus]) and len(top_p) == nucleus


def test_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    draws = [sample(logits, SamplingParams(temperature=1.0, seed=s), 3) for s in range(3000)]
    shares = [draws.count(t) / len(draws) for t in range(3)]
    assert abs(shares[0] - 0.7) < 0.04 and abs(shares[1] - 0.2) < 0.04, shares


def test_a_requeued_request_continues_with_the_same_tokens_in_another_batch(tiny_dir):
    """A request run alone, and the same request re-submitted after 5 tokens (as the front-end
    re-queues it onto a survivor) next to two other requests, emit the same tokens."""
    model = load_model(str(tiny_dir), dtype=torch.float64)
    params = SamplingParams(max_tokens=14, temperature=0.9, top_k=40, top_p=0.95, seed=11)
    prompt = [5, 17, 300, 42]
    alone = Engine(model, kv_blocks=64)
    alone.add(Sequence("r", prompt, [], params))
    expected = alone.run_to_completion()["r"]

    engine = Engine(model, kv_blocks=64)
    engine.add(Sequence("x", [9, 9, 9], [], SamplingParams(max_tokens=9, temperature=1.0, seed=1)))
    engine.add(Sequence("r", prompt, expected[:5], params))
    engine.add(Sequence("y", [1] * 7, [], SamplingParams(max_tokens=12)))
    resumed = engine.run_to_completion()["r"]
    assert expected[:5] + resumed == expected


def test_a_stop_token_ends_the_request_with_stop(tiny_dir):
    model = load_model(str(tiny_dir), dtype=torch.float64)
    engine = Engine(model, kv_blocks=64)
    engine.add(Sequence("r", [1, 2, 3], [], SamplingParams(max_tokens=12)))
    tokens = engine.run_to_completion()["r"]
    stop = tokens[4]
    engine.add(Sequence("s", [1, 2, 3], [], SamplingParams(max_tokens=12, stop_token_ids=(stop,))))
    events = []
    while engine.scheduler.has_work():
        events += engine.step()
    assert [e.token for e in events] == tokens[: tokens.index(stop) + 1]
    assert events[-1].finished is not None and events[-1].finished.value == "stop"
