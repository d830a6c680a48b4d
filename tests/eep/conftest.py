"""Fixtures of the runtime tests: tiny random checkpoints written once per session."""

from __future__ import annotations

import os

import pytest
import torch

from eep.model import ModelConfig, write_random_checkpoint

# transformers (the parity tests' oracle) must never reach for the Hub: the checkpoints are local
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_config):
    """The tiny model in fp32, several shards with an index (as HF writes big models)."""
    path = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(path, tiny_config, seed=0, dtype=torch.float32, shard_bytes=300_000)
    return path
