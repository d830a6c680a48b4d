"""The Qwen3-MoE model: parity with transformers, expert-local pieces, loading, random weights."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from eep.model import (
    ModelConfig,
    Qwen3MoeModel,
    checkpoint_layout,
    expert_tensor_names,
    load_model,
    write_random_checkpoint,
)
from eep.model.layers import causal_attention
from eep.model.qwen3_moe import hf_name

# fp32 on CPU: our ops and transformers' differ only in summation order (measured ~3e-6)
ATOL = RTOL = 1e-4

VARIANTS = {
    # tiny(): layer 1 dense via mlp_only_layers, norm_topk_prob, untied head
    "tiny": {},
    # every 2nd layer MoE, no top-k renormalisation, tied embeddings, 3 of 8 experts a token
    "sparse_step_tied": dict(
        decoder_sparse_step=2,
        mlp_only_layers=(),
        norm_topk_prob=False,
        tie_word_embeddings=True,
        num_experts_per_tok=3,
    ),
}


def _ids(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_dir(request, tmp_path_factory):
    config = ModelConfig.tiny().replace(**VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    write_random_checkpoint(path, config, seed=3, dtype=torch.float32)
    return path


def _transformers_model(path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers (a test dependency) is needed for the parity test"
    )
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf.eval()


def test_logits_equal_transformers_on_the_same_checkpoint(variant_dir):
    hf = _transformers_model(variant_dir)
    ours = load_model(variant_dir)
    ids = _ids(2, 16, ours.config.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids).logits.float()
    got = ours(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_greedy_tokens_equal_transformers(variant_dir):
    hf = _transformers_model(variant_dir)
    ours = load_model(variant_dir)
    ids = _ids(2, 6, ours.config.vocab_size, seed=1)
    with torch.no_grad():
        want = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert torch.equal(ours.generate_greedy(ids, 10), want)


def test_a_checkpoint_saved_by_transformers_loads_unchanged(tmp_path, tiny_dir):
    hf = _transformers_model(tiny_dir)
    hf.save_pretrained(tmp_path)  # transformers 5 writes num_local_experts, per-expert tensors
    want, got = load_model(tiny_dir), load_model(tmp_path)
    assert got.config == want.config
    assert all(torch.equal(p, q) for p, q in zip(got.parameters(), want.parameters(), strict=True))


def test_engine_pieces_split_over_two_ranks_reproduce_forward(tiny_dir, tiny_config):
    """What an EP engine does: attention with the layer's pieces, experts split over ranks."""
    full = load_model(tiny_dir)
    ranks = [load_model(tiny_dir, local_experts=le) for le in ((6, 0, 2, 4), (1, 3, 5, 7))]
    ids = _ids(1, 9, tiny_config.vocab_size).reshape(-1)
    positions = torch.arange(ids.numel())
    h = full.embed(ids)
    with torch.no_grad():
        for i, layer in enumerate(full.layers):
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.qkv(x, positions)
            h = h + layer.self_attn.out(causal_attention(q, k, v, layer.self_attn.scale))
            x = layer.post_attention_layernorm(h)
            h = h + (_split_moe(ranks, i, x) if layer.is_moe else layer.mlp(x))
        got = full.final(h)
    torch.testing.assert_close(got, full(ids[None])[0], atol=1e-5, rtol=1e-5)


def _split_moe(ranks: list[Qwen3MoeModel], layer: int, x: torch.Tensor) -> torch.Tensor:
    topk_ids, topk_weights = ranks[0].layers[layer].moe.route(x)
    assert topk_ids.dtype == torch.int64 and topk_weights.dtype == torch.float32
    out = torch.zeros_like(x)
    for rank in ranks:
        moe = rank.layers[layer].moe
        for local_idx, e in enumerate(moe.local_experts):
            token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
            y = moe.expert_forward(x[token], local_idx)
            out.index_add_(0, token, y * topk_weights[token, slot, None])
    return out


def test_local_experts_hold_exactly_their_checkpoint_weights(tiny_dir, tiny_config):
    local = (5, 2)
    model = load_model(tiny_dir, local_experts=local)
    moe = model.layers[0].moe
    inter = tiny_config.moe_intermediate_size
    assert moe.local_experts == local
    assert moe.w_gate_up.shape == (2, 2 * inter, tiny_config.hidden_size)
    assert moe.w_down.shape == (2, tiny_config.hidden_size, inter)
    assert moe.w_gate_up.is_contiguous() and moe.w_down.is_contiguous()
    shards = {}
    for f in sorted(tiny_dir.glob("*.safetensors")):
        shards.update(load_file(f))
    for local_idx, e in enumerate(local):
        gate, up, down = (shards[n] for n in expert_tensor_names(tiny_config, 0, e))
        assert torch.equal(moe.w_gate_up[local_idx], torch.cat([gate, up]))
        assert torch.equal(moe.w_down[local_idx], down)


def test_forward_local_refuses_experts_it_does_not_hold(tiny_dir):
    model = load_model(tiny_dir, local_experts=(0, 1))
    moe = model.layers[0].moe
    x = torch.randn(3, model.config.hidden_size)
    ids = torch.tensor([[0, 1], [1, 0], [0, 6]])
    with pytest.raises(ValueError, match=r"non-local experts \[6\]"):
        moe.forward_local(x, ids, torch.full((3, 2), 0.5))


def test_dense_layers_follow_mlp_only_layers_and_sparse_step():
    config = ModelConfig.tiny().replace(
        num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=(3,)
    )
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    model = Qwen3MoeModel(config, local_experts=(1,))
    assert [layer.is_moe for layer in model.layers] == [False, True, False, False, False, True]
    assert model.layers[0].moe is None and model.layers[1].mlp is None


def test_checkpoint_layout_names_every_model_parameter(tiny_config):
    model = Qwen3MoeModel(tiny_config)
    names = {
        hf_name(n) for n, _ in model.named_parameters() if not n.endswith(("w_gate_up", "w_down"))
    }
    layout = dict(checkpoint_layout(tiny_config))
    experts = {
        n
        for i in tiny_config.moe_layers
        for e in range(tiny_config.num_experts)
        for n in expert_tensor_names(tiny_config, i, e)
    }
    assert set(layout) == names | experts
    with pytest.raises(ValueError):
        expert_tensor_names(tiny_config, 1, 0)  # layer 1 of tiny() is dense


def test_random_checkpoint_is_deterministic_whatever_the_sharding(tmp_path, tiny_config):
    config = tiny_config.replace(num_hidden_layers=2, mlp_only_layers=())
    for name, seed, shard in (("a", 7, 1 << 30), ("b", 7, 50_000), ("c", 8, 1 << 30)):
        write_random_checkpoint(tmp_path / name, config, seed=seed, shard_bytes=shard)
    a, b, c = (_all_tensors(tmp_path / n) for n in "abc")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 1
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(a[n].dtype == torch.bfloat16 for n in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)


def _all_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_transformers5_fused_expert_layout_loads_too(tmp_path, tiny_dir, tiny_config):
    tensors = _all_tensors(tiny_dir)
    for i in tiny_config.moe_layers:
        per = [expert_tensor_names(tiny_config, i, e) for e in range(tiny_config.num_experts)]
        gate_up = [torch.cat([tensors.pop(g), tensors.pop(u)]) for g, u, _ in per]
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [tensors.pop(d) for _, _, d in per]
        )
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    want = load_model(tiny_dir, local_experts=(7, 3))
    got = load_model(tmp_path, local_experts=(7, 3))
    assert all(torch.equal(p, q) for p, q in zip(got.parameters(), want.parameters(), strict=True))


def test_bf16_model_runs_with_fp32_logits(tiny_dir):
    model = load_model(tiny_dir, dtype=torch.bfloat16)
    ref = load_model(tiny_dir)
    ids = _ids(1, 8, model.config.vocab_size)
    got = model(ids)
    assert got.dtype == torch.float32 and model.embed_tokens.weight.dtype == torch.bfloat16
    want = ref(ids)
    # bf16 rounding can flip a near-tied routing choice, so no elementwise bound: the logits
    # must still agree as a whole
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cosine > 0.98


def test_make_weights_tool_writes_a_loadable_checkpoint(tmp_path, capsys):
    from eep.tools import make_weights

    parser = argparse.ArgumentParser()
    make_weights.add_arguments(parser)
    out = tmp_path / "w"
    args = parser.parse_args(
        ["--config", "tiny", "--out", str(out), "--layers", "2", "--dtype", "fp32", "--seed", "5"]
    )
    assert make_weights.run(args) == 0
    model = load_model(out)
    assert model.config.num_hidden_layers == 2 and model.config.mlp_only_layers == (1,)
    assert "done in" in capsys.readouterr().out
    again = ["--config", str(out / "config.json"), "--out", str(tmp_path / "w2")]
    config_args = parser.parse_args([*again, "--dtype", "fp32", "--seed", "5"])
    assert make_weights.run(config_args) == 0
    assert all(
        torch.equal(v, _all_tensors(out)[k]) for k, v in _all_tensors(tmp_path / "w2").items()
    )
