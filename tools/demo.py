"""``eep demo``: the README's main job, at the stage the project has reached.

Today it shows the membership layer end to end on this machine: an embedded etcd, a
coordinator, four membership-only ranks (``eep.tools.member_proc``), one rank SIGKILLed and
its lease revoked by its supervisor (this process), the rank restarted and re-admitted, and
the timeline of committed views. Serving a model through the failure arrives with the EP
runtime (see the issues).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slots", type=int, default=4, help="ranks to start (default 4)")
    parser.add_argument("--kill", type=int, default=2, help="the slot to kill (default 2)")
    parser.add_argument("--ttl", type=int, default=3, help="lease TTL in s (default 3)")


def run(args: argparse.Namespace) -> int:
    from eep.membership.commit import read_history
    from eep.membership.etcd import EtcdClient
    from eep.membership.keys import Keys
    from eep.membership.registry import revoke_slot
    from eep.membership.server import EtcdServer
    from eep.membership.watcher import ViewWatcher

    if not 0 <= args.kill < args.slots:
        raise SystemExit(f"--kill {args.kill} must name one of the {args.slots} slots")
    workdir = tempfile.mkdtemp(prefix="eep-demo-")
    t0 = time.monotonic()
    marks: list[tuple[float, str]] = []

    def mark(text: str) -> None:
        marks.append((time.monotonic() - t0, text))
        print(f"[{marks[-1][0]:7.3f} s] {text}", flush=True)

    with EtcdServer(data_dir=workdir) as server:
        mark(f"etcd up at {server.endpoint} (data in {workdir})")
        client, keys = EtcdClient(server.endpoint), Keys("demo")
        common = ["--etcd", server.endpoint, "--cluster", "demo"]
        logf = open(os.path.join(workdir, "processes.log"), "ab")  # noqa: SIM115

        def spawn(*argv: str) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", *argv, *common], stdout=logf, stderr=logf
            )

        procs = [spawn("eep.tools.cli", "coordinator", "--ttl", str(args.ttl))]
        ranks = {
            s: spawn("eep.tools.member_proc", "--slot", str(s), "--ttl", str(args.ttl))
            for s in range(args.slots)
        }
        watcher = ViewWatcher(
            client, keys, on_view=lambda v: mark(f"view {v.epoch}: {list(v.members)} ({v.reason})")
        ).start()
        try:
            if not watcher.wait_for(lambda v: len(v.members) == args.slots, 30):
                raise SystemExit(f"demo: the ranks did not all join; see {workdir}")
            victim = ranks[args.kill]
            os.kill(victim.pid, signal.SIGKILL)
            mark(f"slot {args.kill} (pid {victim.pid}) SIGKILLed")
            victim.wait(timeout=10)
            revoke_slot(client, keys, args.kill)
            mark(f"supervisor revoked slot {args.kill}'s lease")
            watcher.wait_for(lambda v: args.kill not in v.members, 30)
            ranks[args.kill] = spawn(
                "eep.tools.member_proc", "--slot", str(args.kill), "--ttl", str(args.ttl)
            )
            mark(f"slot {args.kill} restarted (pid {ranks[args.kill].pid})")
            if not watcher.wait_for(lambda v: args.kill in v.members, 30):
                raise SystemExit(f"demo: slot {args.kill} did not rejoin; see {workdir}")
            history = read_history(client, keys)
        finally:
            watcher.stop()
            for proc in [*procs, *ranks.values()]:
                proc.kill()
                proc.wait(timeout=10)
    print("\nview history:")
    for view in history:
        print(
            f"  epoch {view.epoch}: members {list(view.members)}  incarnations "
            f"{dict(view.incarnations)}  ({view.reason})"
        )
    epochs = [v.epoch for v in history]
    ok = epochs == list(range(1, len(epochs) + 1))
    print(
        f"\nepochs contiguous: {ok}; slot {args.kill} back as incarnation "
        f"{history[-1].incarnation(args.kill)}"
    )
    return 0 if ok else 1
