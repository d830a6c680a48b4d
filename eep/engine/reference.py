"""The fault-free, single-process result that a cluster's outputs must equal.

One engine with every expert local serves the requests; tests, ``eep demo`` and
``eep bench recovery`` compare what a cluster streamed against it token for token.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from eep.model.qwen3_moe import load_model

from .engine import Engine
from .sampling import SamplingParams
from .sequence import Sequence


def single_process_outputs(
    model_path: str,
    prompts: Seq[Seq[int]],
    params: Seq[SamplingParams],
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
) -> list[list[int]]:
    """The output tokens of each prompt under its sampling parameters."""
    engine = Engine(load_model(model_path, device=device, dtype=dtype), kv_blocks=512)
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add(Sequence(str(i), list(prompt), [], p))
    out = engine.run_to_completion()
    return [out[str(i)] for i in range(len(prompts))]
