"""Run one function per GPU rank in spawned processes; every wait bounded, results as JSON."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import torch.multiprocessing as mp

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, outdir: str, kwargs: dict) -> None:
    os.environ.update(NVLS_OFF, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    result = fn(rank, world, **kwargs)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # A dead peer can hang the process group's teardown; the result is on disk.
    os._exit(0)


def run_ranks(fn, world: int, timeout_s: float, **kwargs) -> list[dict | None]:
    """Starts ``fn(rank, world, **kwargs)`` on ranks ``0..world-1`` (``fn`` returns a JSON-able
    dict); returns each rank's dict, ``None`` for a rank that died or did not finish."""
    ctx = mp.get_context("spawn")
    outdir = tempfile.mkdtemp(prefix="eep-ranks-")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, outdir, kwargs), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join(5)
        path = os.path.join(outdir, f"rank{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else None)
    return results
