"""Typed errors of the model package."""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error the model package raises on bad input from outside."""


class CheckpointError(ModelError):
    """A model directory that cannot be served: no or bad ``config.json``, missing tensors,
    tensors of the wrong shape, unreadable shards. The message names what is wrong."""
