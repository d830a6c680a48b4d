"""The cluster-shape flags of the commands that start a cluster: one definition each
(``add_cluster_arguments``), read back through the one builder (``runtime_config``)."""

from __future__ import annotations

import json

import pytest

from eep.model.config import ModelConfig
from eep.tools.cli import build_parser
from eep.tools.common import runtime_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps(ModelConfig.tiny().to_hf_dict()))
    return str(path)


def _launch(model_dir: str, *argv: str):
    from eep.tools.launch import runtime_config as launch_config

    args = build_parser().parse_args(["launch", "--model", model_dir, *argv])
    return launch_config(args, model_dir)


def test_launch_defaults_on_cpu_and_cuda(model_dir):
    cpu = _launch(model_dir)
    assert (cpu.device, cpu.dtype, cpu.fabric, cpu.ttl_s) == ("cpu", "float32", "shm", 3)
    assert cpu.exchange_timeout_s == 2.0 and cpu.cuda_graphs is False
    gpu = _launch(model_dir, "--device", "cuda")
    assert (gpu.dtype, gpu.fabric, gpu.exchange_timeout_s, gpu.cuda_graphs) == (
        "bfloat16",
        "symm",
        0.5,
        True,
    )
    assert _launch(model_dir, "--device", "cuda", "--baseline").fabric == "nccl"


def test_launch_flags_are_read_back(model_dir):
    cfg = _launch(
        model_dir,
        *("--slots", "2", "--experts-per-slot", "5", "--ttl", "4", "--cluster", "x"),
        *("--exchange-timeout", "0.75", "--dtype", "float64", "--cuda-graphs"),
    )
    assert (cfg.cluster, cfg.num_slots, cfg.experts_per_slot, cfg.ttl_s) == ("x", 2, 5, 4)
    assert (cfg.exchange_timeout_s, cfg.dtype, cfg.cuda_graphs) == (0.75, "float64", True)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--fabric", "symm"], "fabric 'symm' does not run on device 'cpu'"),
        (["--fabric", "nccl"], "fabric 'nccl' has a fixed membership"),
        (["--exchange-timeout", "0"], "exchange_timeout_s must be > 0"),
        (["--ttl", "0"], "ttl_s must be >= 1"),
    ],
)
def test_launch_refuses_a_bad_value_naming_it(model_dir, argv, says):
    with pytest.raises(SystemExit, match=says):
        _launch(model_dir, *argv)


def test_a_command_without_a_flag_gets_the_builder_default(model_dir):
    demo = build_parser().parse_args(["demo", "--slots", "3"])
    cfg = runtime_config(demo, model_dir, "d", exact=True)
    assert (cfg.num_slots, cfg.dtype, cfg.ttl_s, cfg.exchange_timeout_s) == (3, "float64", 3, 2.0)


def test_every_command_shares_the_flag_definitions(model_dir):
    parser = build_parser()
    for argv in (["launch", "--tiny"], ["bench", "recovery"], ["bench", "chaos"], ["demo"]):
        args = parser.parse_args(argv)
        assert args.slots == 4
        if hasattr(args, "ttl"):
            assert args.ttl == 3
    recovery = parser.parse_args(["bench", "recovery", "--device", "cuda"])
    assert recovery.exchange_timeout is None
    assert runtime_config(recovery, model_dir, "r").exchange_timeout_s == 0.5
    assert (
        runtime_config(parser.parse_args(["launch", "--tiny"]), model_dir, "l").exchange_timeout_s
        == 2.0
    )


# --- the admission flags (eep launch) ----------------------------------------------------


def test_admission_flags_are_read_back_and_default_to_the_config(model_dir):
    cfg = _launch(
        model_dir,
        *("--max-model-len", "300", "--max-num-seqs", "8"),
        *("--max-queue", "5", "--quarantine-after", "2"),
    )
    assert (cfg.max_model_len, cfg.max_num_seqs, cfg.max_queue, cfg.quarantine_after) == (
        300,
        8,
        5,
        2,
    )
    cfg = _launch(model_dir)
    assert (cfg.max_model_len, cfg.max_num_seqs, cfg.max_queue, cfg.quarantine_after) == (
        0,
        256,
        1024,
        3,
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--max-model-len", "99999"], "max_model_len must be in"),
        (["--max-queue", "-1"], "max_queue must be >= 0"),
        (["--quarantine-after", "0"], "quarantine_after must be >= 1"),
        (["--max-num-seqs", "0"], "max_num_seqs must be >= 1"),
    ],
)
def test_a_bad_admission_flag_is_refused_naming_it(model_dir, argv, says):
    with pytest.raises(SystemExit, match=says):
        _launch(model_dir, *argv)


def test_the_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # unwrapped
    assert "a request asking for more is refused with a 400" in text
    assert "is answered 429 with a Retry-After header" in text
    assert "instead of re-queued again" in text
    assert "sequences one rank decodes at once" in text


def test_standby_stage_defaults_to_the_device_and_is_read_back(model_dir):
    assert _launch(model_dir).standby_stage is True  # on cpu
    assert _launch(model_dir, "--no-standby-stage").standby_stage is False
    parser = build_parser()
    recovery = parser.parse_args(["bench", "recovery", "--device", "cuda"])
    assert runtime_config(recovery, model_dir, "r").standby_stage is False  # on cuda
    recovery = parser.parse_args(["bench", "recovery", "--device", "cuda", "--standby-stage"])
    assert runtime_config(recovery, model_dir, "r").standby_stage is True
