"""``eep.config``: the one builder of a cluster's RuntimeConfig, its device-dependent
defaults, its JSON round trip and its refusals (each naming the field)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from eep.config import (
    RuntimeConfig,
    default_cuda_graphs,
    default_dtype,
    default_exchange_timeout_s,
    default_fabric,
    default_standby_stage,
)
from eep.placement import two_replica_experts_per_slot

NUM_EXPERTS = 8


def _build(**over) -> RuntimeConfig:
    kw = dict(cluster="c", model_path="m", num_slots=4, num_experts=NUM_EXPERTS)
    return RuntimeConfig.for_cluster(**(kw | over))


def test_the_device_defaults():
    assert default_exchange_timeout_s("cpu") == 2.0
    assert default_exchange_timeout_s("cuda") == 0.5
    assert default_dtype("cpu") == "float32" and default_dtype("cpu", exact=True) == "float64"
    assert default_dtype("cuda") == default_dtype("cuda", exact=True) == "bfloat16"
    assert default_fabric("cpu") == default_fabric("cpu", baseline=True) == "shm"
    assert default_fabric("cuda") == "symm" and default_fabric("cuda", baseline=True) == "nccl"
    assert not default_cuda_graphs("cpu") and default_cuda_graphs("cuda")
    assert default_standby_stage("cpu") and not default_standby_stage("cuda")
    with pytest.raises(ValueError, match="device 'tpu'"):
        default_exchange_timeout_s("tpu")


def test_builder_defaults_on_cpu():
    cfg = _build()
    assert cfg.model_path == os.path.abspath("m")
    assert cfg.experts_per_slot == two_replica_experts_per_slot(NUM_EXPERTS, 4) == 4
    assert (cfg.device, cfg.dtype, cfg.fabric) == ("cpu", "float32", "shm")
    assert cfg.exchange_timeout_s == 2.0 and cfg.cuda_graphs is False
    assert cfg.standby_stage is True
    assert cfg.ttl_s == 3 and cfg.max_num_seqs == 256 and cfg.pull_hold_s == 0.0
    assert _build(exact=True).dtype == "float64"
    assert _build(baseline=True).fabric == "shm"


def test_builder_defaults_on_cuda():
    cfg = _build(device="cuda")
    assert (cfg.dtype, cfg.fabric) == ("bfloat16", "symm")
    assert cfg.exchange_timeout_s == 0.5 and cfg.cuda_graphs is True
    assert cfg.standby_stage is False  # it would hold the slot's arenas twice in GPU memory
    assert _build(device="cuda", baseline=True).fabric == "nccl"


def test_given_settings_win_and_none_takes_the_default():
    cfg = _build(
        device="cuda",
        dtype="float32",
        experts_per_slot=6,
        exchange_timeout_s=1.5,
        cuda_graphs=False,
        ttl_s=5,
        max_num_seqs=16,
    )
    assert (cfg.dtype, cfg.experts_per_slot, cfg.exchange_timeout_s) == ("float32", 6, 1.5)
    assert (cfg.cuda_graphs, cfg.ttl_s, cfg.max_num_seqs) == (False, 5, 16)
    assert _build(exchange_timeout_s=None, ttl_s=None, cuda_graphs=None) == _build()


def test_direct_construction_takes_the_same_device_defaults():
    cfg = RuntimeConfig(cluster="c", model_path="/m", num_slots=2, experts_per_slot=2)
    assert (cfg.dtype, cfg.exchange_timeout_s, cfg.cuda_graphs) == ("float32", 2.0, False)
    gpu = RuntimeConfig("c", "/m", 2, 2, device="cuda", fabric="symm")
    assert (gpu.dtype, gpu.exchange_timeout_s, gpu.cuda_graphs) == ("bfloat16", 0.5, True)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_json_round_trip(device):
    cfg = _build(device=device, pull_hold_s=1.5, fabric_store="127.0.0.1:1234")
    again = RuntimeConfig.from_json(cfg.to_json())
    assert again == cfg
    assert RuntimeConfig.from_json(cfg.to_json().encode()) == cfg


def test_json_with_an_unknown_field_is_refused():
    raw = _build().to_json().replace('"cluster"', '"clustre"')
    with pytest.raises(ValueError, match="unknown fields"):
        RuntimeConfig.from_json(raw)


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"num_slots": 0}, "num_slots"),
        ({"experts_per_slot": 0}, "experts_per_slot"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"fabric": "ib"}, "fabric"),
        ({"fabric": "symm"}, "fabric"),  # symm is for GPUs
        ({"device": "cuda", "fabric": "shm"}, "fabric"),  # shm is for CPU processes
        ({"fabric": "nccl"}, "fabric"),  # fixed membership: only the baseline
        ({"ttl_s": 0}, "ttl_s"),
        ({"exchange_timeout_s": 0.0}, "exchange_timeout_s"),
        ({"exchange_timeout_s": -1.0}, "exchange_timeout_s"),
        ({"max_tokens_per_step": 0}, "max_tokens_per_step"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"kv_blocks": 0}, "kv_blocks"),
        ({"block_size": 0}, "block_size"),
        ({"pull_hold_s": -0.1}, "pull_hold_s"),
        ({"num_experts": None}, "experts_per_slot"),
    ],
)
def test_a_bad_value_is_a_value_error_naming_the_field(over, field):
    with pytest.raises(ValueError, match=rf"RuntimeConfig\.{field}\b"):
        _build(**over)


def test_a_bad_value_in_json_is_refused_too():
    raw = (
        dataclasses.replace(_build(), kv_blocks=1)
        .to_json()
        .replace('"kv_blocks": 1', '"kv_blocks": 0')
    )
    with pytest.raises(ValueError, match=r"RuntimeConfig\.kv_blocks"):
        RuntimeConfig.from_json(raw)


def test_the_config_module_does_not_import_torch():
    """The front-end imports eep.config and must not pay for torch."""
    code = "import sys, eep.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'{"cluster": "c"}', b"[" * 50_000, b'{"cluster": 1, "bogus": 2}'],
)
def test_a_garbage_config_is_a_value_error_that_says_so(raw):
    with pytest.raises(ValueError, match="runtime config"):
        RuntimeConfig.from_json(raw)
