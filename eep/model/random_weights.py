"""A checkpoint of random weights for any config, in the Hugging Face layout.

Deterministic: every tensor is drawn from its own generator, seeded from ``(seed, name)``, so
the values do not depend on shard size, thread count or how many layers were written.
Streaming: shards are planned up front, then filled and written one at a time (tensors of a
shard drawn in parallel threads), so memory stays near one shard whatever the model size.

Values: matrices uniform with std ``1/sqrt(fan_in)`` (activations keep their scale through
the layers, router and output logits have std ~1); norm weights ``1 +- 0.1``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import INDEX_FILE, Shape, checkpoint_layout
from .config import CONFIG_FILE, ModelConfig

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """The tensors (``(name, shape)`` in order) of one shard file and its size."""

    file: str
    tensors: tuple[tuple[str, Shape], ...]
    nbytes: int


def plan_shards(config: ModelConfig, dtype: torch.dtype, shard_bytes: int) -> list[ShardPlan]:
    """Split the checkpoint layout into files of at most ``shard_bytes`` (or one tensor)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    groups: list[list[tuple[str, Shape]]] = [[]]
    sizes = [0]
    for name, shape in checkpoint_layout(config):
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and sizes[-1] + nbytes > shard_bytes:
            groups.append([])
            sizes.append(0)
        groups[-1].append((name, shape))
        sizes[-1] += nbytes
    n = len(groups)
    return [
        ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g), size)
        for i, (g, size) in enumerate(zip(groups, sizes, strict=True))
    ]


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_tensor(seed: int, name: str, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``name`` of the checkpoint of ``seed``: ``shape`` in ``dtype``, on the CPU."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    values = torch.empty(shape, dtype=torch.float32)
    if len(shape) == 1:  # a norm weight
        values.uniform_(0.9, 1.1, generator=gen)
    else:
        bound = math.sqrt(3.0 / shape[-1])
        values.uniform_(-bound, bound, generator=gen)
    return values.to(dtype)


def _write_shard(path: Path, plan: ShardPlan, seed: int, dtype: torch.dtype, pool, tick) -> None:
    """Draw the shard's tensors in ``pool`` (``tick(nbytes)`` after each), then write it."""
    from safetensors.torch import save_file

    tensors = {}
    draws = pool.map(lambda t: (t[0], random_tensor(seed, t[0], t[1], dtype)), plan.tensors)
    for name, tensor in draws:
        tensors[name] = tensor
        tick(tensor.nbytes)
    tmp = path / (plan.file + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / plan.file)


def write_random_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 << 30,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write ``config.json``, safetensors shards and ``model.safetensors.index.json`` to
    ``path`` (created if absent). ``progress(done_bytes, total_bytes)`` is called after each
    tensor is drawn (the last call, ``done == total``, once everything is on disk). The result
    loads with :func:`eep.model.load_model` and transformers' ``Qwen3MoeForCausalLM``."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}.")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}.")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(config, dtype, shard_bytes)
    total = sum(s.nbytes for s in shards)
    done = 0

    def tick(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None and done < total:
            progress(done, total)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for shard in shards:
            _write_shard(out, shard, seed, dtype, pool, tick)
    _write_index(out, shards, total)
    _write_config(out, config, dtype)
    if progress is not None:
        progress(total, total)


def _write_index(out: Path, shards: list[ShardPlan], total: int) -> None:
    weight_map = {name: s.file for s in shards for name, _ in s.tensors}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(out: Path, config: ModelConfig, dtype: torch.dtype) -> None:
    hf = config.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = _DTYPE_NAMES[dtype]
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
