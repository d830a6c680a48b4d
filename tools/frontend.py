"""``eep frontend``: the OpenAI-compatible HTTP front-end of a running cluster."""

from __future__ import annotations

import argparse
import asyncio

from .common import add_etcd_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_etcd_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0: any)")


def run(args: argparse.Namespace) -> int:
    from eep.config import RuntimeConfig
    from eep.frontend.server import serve
    from eep.frontend.tokenizer import TokenizerError, load_tokenizer
    from eep.membership.errors import MembershipError
    from eep.model.config import ModelConfig

    from .common import connect

    client, keys = connect(args)
    try:
        kv = client.get(keys.config)
    except MembershipError as exc:
        print(f"eep frontend: {exc}")
        return 2
    if kv is None:
        print(f"eep frontend: no runtime config at {keys.config}; start with `eep launch`")
        return 2
    cfg = RuntimeConfig.from_json(kv.value)
    model = ModelConfig.from_dir(cfg.model_path)
    try:
        # the checkpoint's own tokenizer where it ships one, else byte-level
        tokenizer = load_tokenizer(cfg.model_path, model.vocab_size)
    except TokenizerError as exc:
        print(f"eep frontend: {exc}")
        return 2
    try:
        asyncio.run(
            serve(
                cfg,
                args.etcd,
                args.host,
                args.port,
                model.vocab_size,
                max_positions=model.max_position_embeddings,
                tokenizer=tokenizer,
            )
        )
    except KeyboardInterrupt:
        pass
    return 0
