"""``eep launch``'s admission flags: defined once in eep.tools.common's cluster flags, read
back into the runtime config the front-end and the ranks read."""

from __future__ import annotations

import json

import pytest

from eep.model.config import ModelConfig
from eep.tools.cli import build_parser


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps(ModelConfig.tiny().to_hf_dict()))
    return str(path)


def _launch(model_dir: str, *argv: str):
    from eep.tools.launch import runtime_config

    args = build_parser().parse_args(["launch", "--model", model_dir, *argv])
    return runtime_config(args, model_dir)


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
