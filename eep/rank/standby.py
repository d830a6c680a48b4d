"""A warm standby worker: a worker process started ahead of need, idle until promoted.

A cold worker spends most of its start in the interpreter and the imports (torch alone is
about 1.5 s on the project's CPU machine) and, on a GPU, in the CUDA context. A standby has
done all of that, and waits on its stdin. When the active worker dies, the supervisor
registers the next incarnation as always and *promotes* the standby by writing
``{"incarnation": n}`` to it; from there it is an ordinary worker (it builds its rank, pulls
its experts from live peers, links to the front-end, turns ready). A new standby is started
once the promoted worker is ready, so it never competes with a recovery for the host.

With ``standby_stage`` (on by default on the CPU) it also stages the slot's rank ahead
(:func:`eep.rank.build.stage_rank`: transfer engine, KV arena, dense weights, expert arena
allocated but not filled), so a promotion only pulls the experts, publishes and rejoins.
A standby touches nothing shared of the slot (status block, etcd records, manifest, fabric
buffers) before its promotion; it only reads. It dies with its supervisor (parent-death
signal), and exits quietly when its stdin closes. What it costs is its resident memory (reported by
:meth:`Standby.rss_bytes`; staged, about an active worker's) and, on a GPU, one CUDA
context.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)

RESPAWN_AFTER_S = 10.0  # a standby that died is replaced at most this often


class Standby:
    def __init__(self, slot: int, log_dir: str | None):
        self.slot, self.log_dir = slot, log_dir
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None  # the live standby's log
        self.started = 0  # standbys started so far (names their logs)
        self._died_at = float("-inf")  # when a standby was last found dead (not promoted)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure(self, args: dict) -> None:
        """Start a standby unless one is alive (or one died less than
        :data:`RESPAWN_AFTER_S` ago: no hot loop)."""
        if self.alive:
            return
        if self.proc is not None:
            log.warning("slot %d: standby exited with %s", self.slot, self.proc.returncode)
            self.proc, self._died_at = None, time.monotonic()
        if time.monotonic() - self._died_at < RESPAWN_AFTER_S:
            return
        self.started += 1
        out, self.log_path = None, None
        if self.log_dir:
            self.log_path = os.path.join(
                self.log_dir, f"worker{self.slot}.standby{self.started}.log"
            )
            out = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "eep.rank.worker", json.dumps({**args, "standby": True})],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        finally:
            if out is not None:
                out.close()

    def promote(self, incarnation: int) -> subprocess.Popen | None:
        """Hand ``incarnation`` to the standby; returns its process, now the worker, or
        ``None`` when there is no live standby (start a cold worker then). Its log is also
        reachable as ``worker<slot>.<incarnation>.log``, as a cold worker's is."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return None
        try:
            proc.stdin.write(json.dumps({"incarnation": incarnation}).encode() + b"\n")
            proc.stdin.close()
        except OSError as exc:  # it died just now
            log.warning("slot %d: standby unusable (%s); starting a cold worker", self.slot, exc)
            proc.kill()
            proc.wait(timeout=10)
            return None
        if self.log_path:
            link = os.path.join(
                os.path.dirname(self.log_path), f"worker{self.slot}.{incarnation}.log"
            )
            try:
                os.symlink(os.path.basename(self.log_path), link)
            except OSError as exc:
                log.warning("slot %d: could not link %s: %s", self.slot, link, exc)
        return proc

    def rss_bytes(self) -> int | None:
        """The standby's resident memory, from /proc (None without a live standby)."""
        if not self.alive:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return None

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
