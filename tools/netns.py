"""Hosts on one machine, for multi-host tests: each host is a Linux network namespace.

:class:`Hosts`: namespaces ``eep-<tag>-h<i>`` (``tag``: 4 random hex digits, so parallel runs
don't clash), each with ``lo`` up and a veth ``eth0`` holding ``10.x.y.<i+1>/24`` of a random
/24 that root does not use, and no default route. The veths' root ends ``eep-<tag>-v<i>`` sit
on a bridge ``eep-<tag>-br`` with no address nor IPv6: the hosts reach each other only. Where
root's iptables sees bridged frames (``br_netfilter``) and its FORWARD is no bare ACCEPT, a
rule accepting the bridge's traffic goes first there while the hosts live. Faults, each with
its heal: ``kill_host``, ``link_down``, ``cut_ports``, ``cut_all_but`` and ``drop`` (the
host's own iptables chains ``EEP-CUT-*``, ``EEP-ONLY-*``, ``EEP-LOSS-*``; loopback is never
cut), ``netem`` (needs sch_netem: :func:`netem_available`). Exiting removes it all, killing the
hosts' processes first; :func:`cleanup_stale` (run on entry) removes what crashed runs left.
An etcd member per host: :mod:`eep.tools.netns_etcd`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

IFACE = "eth0"
PORT_RANGE = "32768 60999"  # ephemeral ports clear of fixed ones (etcd's 2379 and 2380, ...)
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
_ALIAS = "eep-netns owner="  # the bridge's ifalias: its owner's pid and start time
_NF_CALL = "/proc/sys/net/bridge/bridge-nf-call-iptables"
_CLONE_NEWNET = 0x40000000
_ENDS, _WAYS = ("--dport", "--sport"), (("IN", "-i"), ("OUT", "-o"))


class NetnsError(RuntimeError):
    """A namespace, link or firewall command failed."""


def _sh(argv: list[str], input: str | None = None, check: bool = True, timeout: float = 30.0):
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def _batch(lines: list[str], check: bool = True) -> None:
    """``ip -batch``; unchecked, it goes on past failed lines (``-force``)."""
    if lines:
        _sh(["ip", *([] if check else ["-force"]), "-batch", "-"], "\n".join(lines) + "\n", check)


def _read(path: str) -> str | None:
    with contextlib.suppress(OSError), open(path) as f:
        return f.read().strip()
    return None


def _probe(*cmds: list[str]) -> str | None:
    """Run ``cmds`` in a scratch namespace (``{ns}`` in them: its name): why not, or None."""
    probe = f"eep-probe{os.getpid() % 100000}"  # outside the harness's name pattern
    try:
        for cmd in [["ip", "netns", "add", "{ns}"], *cmds]:
            _sh([a.format(ns=probe) for a in cmd], timeout=10)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        _sh(["ip", "netns", "del", probe], check=False)
    return None


@functools.cache
def available() -> str | None:
    """``None`` where this process can make hosts, else why not (the tests' skip reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "iptables-restore", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install iproute2 iptables)"
    veth = ["ip", "-n", "{ns}", "link", "add", "p0", "type", "veth", "peer", "name", "p1"]
    bridge = ["ip", "-n", "{ns}", "link", "add", "b0", "type", "bridge"]
    why = _probe(veth, bridge, ["ip", "netns", "exec", "{ns}", "iptables", "-S"])
    return why and f"network namespaces unusable here: {why}"


@functools.cache
def netem_available() -> str | None:
    """``None`` where :meth:`Hosts.netem` works, else why not (no sch_netem in the kernel)."""
    why = available() or _probe(["tc", "-n", "{ns}", "qdisc", "add", "dev", "lo", "root", "netem"])
    return why and f"tc netem unusable here: {why}"


def _netns_names() -> list[str]:
    return os.listdir("/run/netns") if os.path.isdir("/run/netns") else []


def ns_pids(ns: str) -> list[int]:
    """The processes in namespace ``ns`` (``ip netns pids``; exited ones are not listed)."""
    return [p for p in map(int, _sh(["ip", "netns", "pids", ns], check=False).split())]


def _kill_ns(ns: str, timeout_s: float = 5.0) -> int:
    """SIGKILL every process in ``ns`` until none is left; returns how many were killed."""
    deadline, killed = time.monotonic() + timeout_s, set()
    while pids := [p for p in ns_pids(ns) if p != os.getpid()]:
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {pids} of {ns} survive SIGKILL for {timeout_s} s")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.02)
    return len(killed)


def _starttime(pid: int) -> str | None:
    """Field 22 of ``/proc/PID/stat``, its start in ticks since boot: tells reused pids apart."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[19] if stat else None


def _stale(bridge: str, namespaces: list[str]) -> bool:
    """Left by a dead run: the owner ``bridge`` names is dead, or, with no owner on record,
    every namespace predates this process."""
    alias = _read(f"/sys/class/net/{bridge}/ifalias") or ""
    if alias.startswith(_ALIAS):
        pid, _, start = alias[len(_ALIAS) :].partition(":")
        return not (pid.isdigit() and _starttime(int(pid)) == start)
    since_boot = int(_starttime(os.getpid()) or 0) / os.sysconf("SC_CLK_TCK")
    born = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + since_boot  # this process
    with contextlib.suppress(OSError):  # none: a bridge being made, its owner not yet on it
        made = [os.stat(f"/run/netns/{ns}").st_mtime for ns in namespaces]
        return bool(made) and max(made) < born - 1.0
    return True


def _remove(namespaces: list[str], links: list[str], forward: list[str]) -> None:
    for ns in namespaces:
        with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
            _kill_ns(ns)
    # a veth end's deletion takes its pair at once (a namespace's own teardown comes later);
    # the bridge goes last: it holds the owner's record that tells other runs to keep off
    bridges = [x for x in links if x.endswith("-br")]
    _batch([f"link del {x}" for x in links if x not in bridges], check=False)
    for ns in namespaces:
        _sh(["ip", "netns", "del", ns], check=False)
    _batch([f"link del {x}" for x in bridges], check=False)
    for br in forward:
        _sh(["iptables", "-D", "FORWARD", "-i", br, "-o", br, "-j", "ACCEPT"], check=False)


def cleanup_stale(prefix: str = "eep-") -> list[str]:
    """Remove what dead runs left (names ``<prefix><4 hex>-h<i>|v<i>|br`` only; which: see
    ``_stale``), killing their processes first; returns the names removed."""
    pat = re.compile(rf"^{re.escape(prefix)}([0-9a-f]{{4}})-(h\d+|v\d+|br)$")
    tags: dict[str, tuple[list[str], list[str]]] = {}
    for kind, names in enumerate((_netns_names(), os.listdir("/sys/class/net"))):
        for m in filter(None, map(pat.match, names)):
            tags.setdefault(m[1], ([], []))[kind].append(m[0])
    removed: list[str] = []
    for tag, (namespaces, devs) in tags.items():
        if _stale(f"{prefix}{tag}-br", namespaces):
            _remove(namespaces, devs, [])
            removed += namespaces + devs
    if shutil.which("iptables"):  # FORWARD rules of bridges that are gone
        out, links = _sh(["iptables", "-S", "FORWARD"], check=False), os.listdir("/sys/class/net")
        rule = re.compile(rf"^-A FORWARD -i ({re.escape(prefix)}\S+-br) -o \1 -j ACCEPT$")
        found = [m[1] for line in out.splitlines() if (m := rule.match(line.strip()))]
        _remove([], [], [br for br in found if br not in links])
    return removed


def _in_net(path: str, fn, args, kw):
    """Move this thread (only) into namespace ``path``'s network, then call ``fn``."""
    fd = os.open(path, os.O_RDONLY)
    err = ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET)  # os.setns: Python 3.12+
    os.close(fd)
    if err:
        raise OSError(ctypes.get_errno(), f"setns into {path}")
    return fn(*args, **kw)


class Hosts:
    """``n`` hosts on a bridge; a context manager (see the module's doc)."""

    def __init__(self, n: int = 3, prefix: str = "eep-"):
        self.n, self.prefix, self.tag, self._forward = n, prefix, "", False  # FORWARD rule in?
        self.subnet: ipaddress.IPv4Network | None = None
        self._procs: list[subprocess.Popen] = []
        self._fw: set[int] = set()  # hosts whose chains exist
        self._cut: dict[int, set[int]] = {i: set() for i in range(n)}

    def ns(self, i: int) -> str:
        return f"{self.prefix}{self.tag}-h{i}"

    def veth(self, i: int) -> str:  # the root end of host i's veth, on the bridge
        return f"{self.prefix}{self.tag}-v{i}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}{self.tag}-br"

    def addr(self, i: int) -> str:
        return str(self.subnet.network_address + i + 1)

    def __enter__(self) -> Hosts:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        if reason := available():
            raise NetnsError(reason)
        cleanup_stale(self.prefix)
        taken = set(_netns_names()) | set(os.listdir("/sys/class/net"))
        while not self.tag or any(x.startswith(f"{self.prefix}{self.tag}-") for x in taken):
            self.tag = secrets.token_hex(2)
        if len(self.ns(self.n - 1)) > 15:
            raise ValueError(f"{self.ns(self.n - 1)!r} is longer than an interface name can be")
        out, rng = _sh(["ip", "-4", "-o", "addr"]), random.SystemRandom()
        used = [ipaddress.ip_interface(a).network for a in re.findall(r"inet (\S+)", out)]
        while self.subnet is None or any(self.subnet.overlaps(u) for u in used):
            self.subnet = ipaddress.ip_network(f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24")
        br, own = self.bridge, f"{_ALIAS}{os.getpid()}:{_starttime(os.getpid())}"
        lines = [f"link add name {br} type bridge forward_delay 0", f'link set {br} alias "{own}"']
        for ns, veth in ((self.ns(i), self.veth(i)) for i in range(self.n)):
            lines += [f"netns add {ns}", f"link add {veth} type veth peer name {IFACE} netns {ns}"]
        _batch(lines)
        devs = [self.veth(i) for i in range(self.n)]  # no link-local IPv6 on root's ends:
        no6 = [f"net.ipv6.conf.{d}.disable_ipv6=1" for d in [br, *devs]]
        _sh(["sysctl", "-eqw", *no6], check=False)
        _batch([f"link set {d} master {br} up" for d in devs] + [f"link set {br} up"])
        for i in range(self.n):
            _sh(["ip", "netns", "exec", self.ns(i), "sh", "-ec", self._host_script(i)])
        if _read(_NF_CALL) == "1" and _sh(["iptables", "-S", "FORWARD"]) != "-P FORWARD ACCEPT\n":
            _sh(["iptables", "-I", "FORWARD", "-i", br, "-o", br, "-j", "ACCEPT"])
            self._forward = True

    def _host_script(self, i: int) -> str:
        return (
            f"echo '{PORT_RANGE}' > /proc/sys/net/ipv4/ip_local_port_range\n"
            f"f=/proc/sys/net/ipv6/conf/{IFACE}/disable_ipv6; [ ! -w $f ] || echo 1 > $f\n"
            f"ip link set lo up\nip addr add {self.addr(i)}/{self.subnet.prefixlen} dev {IFACE}\n"
            f"ip link set {IFACE} up\n"
        )

    def close(self) -> None:
        """Kill every host's processes; remove the namespaces, veths, bridge and FORWARD rule.
        Safe to call twice and after a failed set-up."""
        if not self.tag:
            return
        namespaces = [self.ns(i) for i in range(self.n) if self.ns(i) in _netns_names()]
        links = os.listdir("/sys/class/net")
        devs = [d for d in [self.veth(i) for i in range(self.n)] + [self.bridge] if d in links]
        _remove(namespaces, devs, [self.bridge] if self._forward else [])
        for proc in self._procs:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(timeout=5)
        self.__init__(self.n, self.prefix)  # as new: entering again makes new hosts

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in host ``i`` (environment kept; a session of its own by default)."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(i), *argv], **kw)
        self._procs.append(proc)
        return proc

    def run(self, i: int, argv: list[str], timeout: float = 30.0, **kw):
        """Run ``argv`` in host ``i`` to its end: a ``CompletedProcess`` with text output."""
        kw = {"capture_output": True, "text": True, "start_new_session": True, **kw}
        return subprocess.run(["ip", "netns", "exec", self.ns(i), *argv], timeout=timeout, **kw)

    def call(self, i: int, fn, *args, **kw):
        """``fn(*args, **kw)`` in a fresh thread of this process inside host ``i``'s network."""
        with ThreadPoolExecutor(1) as pool:  # its one thread ends with the call
            return pool.submit(_in_net, f"/run/netns/{self.ns(i)}", fn, args, kw).result()

    def pids(self, i: int) -> list[int]:
        return ns_pids(self.ns(i))

    def kill_host(self, i: int, timeout_s: float = 5.0) -> int:
        """SIGKILL every process in host ``i``; returns once none is left (how many died)."""
        killed = _kill_ns(self.ns(i), timeout_s)
        for proc in self._procs:
            proc.poll()  # reap ours
        return killed

    def link_down(self, i: int) -> None:
        _sh(["ip", "-n", self.ns(i), "link", "set", IFACE, "down"])

    def link_up(self, i: int) -> None:
        _sh(["ip", "-n", self.ns(i), "link", "set", IFACE, "up"])

    def cut_ports(self, i: int, ports) -> None:
        """Drop TCP between host ``i`` and the others where either end's port is one of
        ``ports``, both ways (added to the ports cut before)."""
        self._cut[i] |= {int(p) for p in ports}
        rules = [f"-p tcp {e} {p} -j DROP" for p in sorted(self._cut[i]) for e in _ENDS]
        self._chains(i, "EEP-CUT", {w: [f"{d} {IFACE} {r}" for r in rules] for w, d in _WAYS})

    def heal_ports(self, i: int) -> None:
        self._cut[i].clear()
        self._chains(i, "EEP-CUT", {"IN": [], "OUT": []})

    def cut_all_but(self, i: int, ports) -> None:
        """Drop all TCP between host ``i`` and the others but that where either end's port is
        one of ``ports`` (replaces the ports allowed before)."""
        keep = [f"-p tcp {e} {int(p)} -j RETURN" for p in ports for e in _ENDS]
        rules = [*keep, "-p tcp -j DROP"]
        self._chains(i, "EEP-ONLY", {w: [f"{d} {IFACE} {r}" for r in rules] for w, d in _WAYS})

    def heal_all_but(self, i: int) -> None:
        self._chains(i, "EEP-ONLY", {"IN": [], "OUT": []})

    def drop(self, i: int, loss_pct: float) -> None:
        """Drop ``loss_pct`` % of host ``i``'s packets at random, both ways (iptables'
        ``statistic`` match: loss where the kernel has no ``sch_netem``); 0 stops it."""
        rule = f"-m statistic --mode random --probability {loss_pct / 100} -j DROP"
        rules = [rule] if loss_pct > 0 else []
        self._chains(i, "EEP-LOSS", {w: [f"{d} {IFACE} {r}" for r in rules] for w, d in _WAYS})

    def netem(self, i: int, delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Delay (and lose) what host ``i`` sends; replaces the netem set before."""
        args = ["delay", f"{delay_ms}ms"] + (["loss", f"{loss_pct}%"] if loss_pct else [])
        _sh(["tc", "-n", self.ns(i), "qdisc", "replace", "dev", IFACE, "root", "netem", *args])

    def clear_netem(self, i: int) -> None:
        _sh(["tc", "-n", self.ns(i), "qdisc", "del", "dev", IFACE, "root"], check=False)

    def heal(self, i: int) -> None:
        """Undo every fault on host ``i`` but a kill."""
        for heal in (self.link_up, self.heal_ports, self.heal_all_but, self.clear_netem):
            heal(i)
        self.drop(i, 0)

    def _chains(self, i: int, base: str, rules: dict[str, list[str]]) -> None:
        """Set chains ``base``-IN/-OUT of host ``i`` to ``rules``: one ``iptables-restore``."""
        if i not in self._fw and not any(rules.values()):
            return  # no chains yet: nothing to heal
        lines = [f"-F {base}-{way}" for way in rules]
        if i not in self._fw:  # declaring a chain in --noflush mode creates (or flushes) it
            chains = [f"{b}-{w}" for b in ("EEP-CUT", "EEP-ONLY", "EEP-LOSS") for w, _ in _WAYS]
            lines = [f":{c} - [0:0]" for c in chains]
            lines += [f"-A {'INPUT' if c.endswith('IN') else 'OUTPUT'} -j {c}" for c in chains]
        lines += [f"-A {base}-{way} {r}" for way, rs in rules.items() for r in rs]
        cmd = ["ip", "netns", "exec", self.ns(i), "iptables-restore", "--noflush"]
        _sh(cmd, "*filter\n" + "\n".join(lines) + "\nCOMMIT\n")
        self._fw.add(i)
