"""``eep make-weights``: write a random-weight Qwen3-MoE checkpoint (Hugging Face layout).

Deterministic from ``--seed``; streams shard by shard, so the 30B-sized config needs only a
shard's worth of memory (its ~57 GiB in bf16 go to disk; ``--layers`` makes it smaller).
"""

from __future__ import annotations

import argparse
import sys
import time

_PRESETS = ("tiny", "mid", "qwen3-30b-a3b")
_DTYPES = ("bf16", "fp16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help=f"a preset ({', '.join(_PRESETS)}) or the path of a Qwen3-MoE config.json",
    )
    parser.add_argument("--out", required=True, help="output directory (created if absent)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dtype", choices=_DTYPES, default="bf16", help="default bf16")
    parser.add_argument(
        "--layers", type=int, default=None, metavar="N", help="keep only the first N layers"
    )
    parser.add_argument(
        "--shard-gib", type=float, default=2.0, metavar="G", help="shard size in GiB (default 2)"
    )


def _config(args: argparse.Namespace):
    from pathlib import Path

    from eep.model import ModelConfig

    if args.config == "tiny":
        config = ModelConfig.tiny()
    elif args.config == "mid":
        config = ModelConfig.mid()
    elif args.config == "qwen3-30b-a3b":
        config = ModelConfig.qwen3_30b_a3b()
    else:
        path = Path(args.config)
        config = ModelConfig.from_dir(path.parent if path.name == "config.json" else path)
    if args.layers is not None:
        keep = tuple(i for i in config.mlp_only_layers if i < args.layers)
        config = config.replace(num_hidden_layers=args.layers, mlp_only_layers=keep)
    return config


def _progress(start: float):
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.5:
            return  # at most two updates a second
        last[0] = now
        rate = done / max(time.monotonic() - start, 1e-9) / 2**30
        print(
            f"\r  {done / 2**30:7.2f} / {total / 2**30:.2f} GiB  ({rate:.2f} GiB/s)",
            end="" if done < total else "\n",
            flush=True,
        )

    return report


def run(args: argparse.Namespace) -> int:
    import torch

    from eep.model import CheckpointError, write_random_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        config = _config(args)
    except (CheckpointError, ValueError) as exc:
        print(f"eep make-weights: {exc}", file=sys.stderr)
        return 2
    print(
        f"writing {args.config} ({config.num_hidden_layers} layers, {config.num_experts} "
        f"experts, {args.dtype}, seed {args.seed}) to {args.out}",
        flush=True,
    )
    start = time.monotonic()
    write_random_checkpoint(
        args.out,
        config,
        seed=args.seed,
        dtype=dtype,
        shard_bytes=max(1, int(args.shard_gib * 2**30)),
        progress=_progress(start),
    )
    print(f"done in {time.monotonic() - start:.1f} s", flush=True)
    return 0
