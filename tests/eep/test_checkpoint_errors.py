"""Malformed model directories give a CheckpointError that names what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eep.model import CheckpointError, ModelConfig, expert_tensor_names, load_model


@pytest.fixture
def ckpt(tmp_path, tiny_dir):
    """A private copy of the tiny checkpoint, to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, path)
    return path


def _edit_tensors(path, edit) -> None:
    """Apply ``edit(tensors)`` to every shard of ``path`` (the index is left as it was)."""
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, str(shard), metadata={"format": "pt"})


def _edit_config(path, edit) -> None:
    raw = json.loads((path / "config.json").read_text())
    edit(raw)
    (path / "config.json").write_text(json.dumps(raw))


def test_missing_config_json_says_what_directory_is_expected(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json in .*eep make-weights"):
        load_model(ckpt)


def test_config_json_that_is_not_json_is_named(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot parse .*config\.json as JSON"):
        load_model(ckpt)


def test_config_missing_fields_names_them(ckpt):
    _edit_config(ckpt, lambda raw: [raw.pop(k) for k in ("num_experts", "moe_intermediate_size")])
    with pytest.raises(
        CheckpointError,
        match=r"lacks the field\(s\) moe_intermediate_size, "
        r"num_experts",
    ):
        load_model(ckpt)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_experts_per_tok", 9, r"num_experts_per_tok \(9\) must not exceed num_experts \(8\)"),
        ("num_key_value_heads", 3, r"multiple of num_key_value_heads \(3\)"),
        ("hidden_size", "64", r"hidden_size must be an integer >= 1, got '64'"),
        ("mlp_only_layers", [7], r"mlp_only_layers must be layer indices in \[0, 4\)"),
        ("model_type", "llama", r"model_type 'llama'; only 'qwen3_moe'"),
        ("hidden_act", "gelu", r"hidden_act='gelu'; only 'silu'"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, r"rope_type 'yarn'"),
    ],
)
def test_invalid_config_values_are_named(ckpt, field, value, message):
    _edit_config(ckpt, lambda raw: raw.update({field: value}))
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


def test_model_config_validates_in_post_init():
    with pytest.raises(ValueError, match=r"head_dim must be even"):
        ModelConfig.tiny().replace(head_dim=15)


def test_missing_tensors_are_all_named_before_anything_is_loaded(ckpt, tiny_config):
    gone = ["model.layers.2.self_attn.k_norm.weight", *expert_tensor_names(tiny_config, 3, 6)]
    _edit_tensors(ckpt, lambda t: [t.pop(n, None) for n in gone])
    with pytest.raises(CheckpointError, match=r"4 tensor\(s\) missing") as info:
        load_model(ckpt)
    assert all(name in str(info.value) for name in gone)


def test_a_rank_needs_only_its_own_experts(ckpt, tiny_config):
    _edit_tensors(ckpt, lambda t: [t.pop(n, None) for n in expert_tensor_names(tiny_config, 0, 7)])
    load_model(ckpt, local_experts=(0, 1, 2))  # expert 7 is not local: fine
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.7\.up_proj"):
        load_model(ckpt, local_experts=(7,))


def test_mis_shaped_tensors_name_both_shapes(ckpt):
    name = "model.layers.0.mlp.experts.2.down_proj.weight"

    def shrink(tensors):
        if name in tensors:
            tensors[name] = torch.zeros(64, 16)

    _edit_tensors(ckpt, shrink)
    with pytest.raises(CheckpointError, match=rf"{name} is \[64, 16\], expected \[64, 32\]"):
        load_model(ckpt)


def test_a_checkpoint_for_another_config_is_refused(ckpt):
    _edit_config(ckpt, lambda raw: raw.update(hidden_size=128))
    with pytest.raises(CheckpointError, match=r"tensor\(s\) of the wrong shape: .*Regenerate"):
        load_model(ckpt)


def test_a_corrupt_shard_is_named(ckpt):
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    shard.write_bytes(b"\x00garbage")
    (ckpt / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=rf"cannot open checkpoint shard .*{shard.name}"):
        load_model(ckpt)


def test_an_index_naming_absent_shards_is_named(ckpt):
    sorted(ckpt.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match=r"names shard\(s\) \['model-0000"):
        load_model(ckpt)


def test_a_directory_without_weights_is_named(tmp_path, tiny_config):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_model(tmp_path)
