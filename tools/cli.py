"""The ``eep`` command: one entry point, one module per subcommand.

Subcommand modules are imported only when chosen, so ``eep inspect`` never pays for torch.
Each module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module under eep.tools, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "coordinator": ("coordinator", "run a membership coordinator (leader-elected) against etcd"),
    "inspect": ("inspect", "show members, the committed view and the view history"),
    "revoke": ("revoke", "revoke a slot's lease now (the supervisors' crash fast path)"),
    "frontend": ("frontend", "the OpenAI-compatible HTTP front-end of a running cluster"),
    "launch": ("launch", "start a cluster: etcd, coordinator, front-end and one rank per slot"),
    "make-weights": (
        "make_weights",
        "write a random-weight Qwen3-MoE checkpoint (HF layout) for any config",
    ),
    "demo": ("demo", "a local cluster with a rank killed and recovered; prints the timeline"),
}
_BENCHES: dict[str, tuple[str, str]] = {
    "membership": ("bench_membership", "kill-to-commit latency of the TTL and revoke paths"),
    "kernels": ("bench_kernels", "EP kernels: dispatch/combine and grouped GEMM speed"),
    "transfer": ("bench_transfer", "GB/s of a recovery-sized weight pull from 1-3 sources"),
    "recovery": ("bench_recovery", "rank killed at capacity: served rate, stalls, vs full restart"),
    "serve": ("bench_serve", "decode tokens/s: elastic fabric vs checks off vs the NCCL baseline"),
    "chaos": ("bench_chaos", "fault matrix: named fault cases x repeats, every invariant checked"),
    "stability": ("bench_stability", "clean launches and steady load: no view change may happen"),
    "control-plane": (
        "bench_control_plane",
        "etcd stalls, etcd leader kill, front-end and coordinator kills: tokens/s timelines",
    ),
    "placement": (
        "bench_placement",
        "planner at EP32-EP256 simulated: orphans and bytes moved vs failures and redundancy",
    ),
    "multihost": (
        "bench_multihost",
        "ranks on several hosts (namespaces): tokens/s vs one host, host faults' timelines",
    ),
}


def _add_group(sub, table: dict[str, tuple[str, str]]) -> None:
    for name, (module, help_text) in table.items():
        try:
            loaded = _load(module)
        except ModuleNotFoundError as exc:
            if exc.name != f"eep.tools.{module}":
                raise
            continue  # a command whose module this installation lacks is not offered
        parser = sub.add_parser(name, help=help_text, description=help_text)
        parser.set_defaults(_module=module)
        loaded.add_arguments(parser)


def _load(module: str):
    return importlib.import_module(f"eep.tools.{module}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eep",
        description="EEP: elastic expert parallelism for MoE inference. "
        "Membership lives in etcd; see README.md for the key schema.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_group(sub, _COMMANDS)
    bench = sub.add_parser("bench", help="benchmarks (print ratios, write JSON)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    _add_group(bench_sub, _BENCHES)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(_load(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
