"""The multi-host harness (``eep.tools.netns``): three hosts in network namespaces on a bridge,
reached by small Python programs run inside them; each fault proven to land and to heal; an
etcd cluster across the hosts; and nothing left behind, after an error or a crash too.

Skipped, with the reason, where namespaces can't be made (not root, no ``ip``/``iptables``, a
container without the capability); the latency test also where the kernel has no sch_netem.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from eep.tools.netns import Hosts, available, cleanup_stale, netem_available
from eep.tools.netns_etcd import start_etcd

PORTS = (7100, 7101, 7102)  # the echo server's, in host 2
REACH_S, BLOCKED_S = 5.0, 1.0  # connect timeouts: a live path answers in ms; a cut one never

ECHO = r"""
import socket, sys, threading
def echo(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)
def serve(sock):
    while True:
        threading.Thread(target=echo, args=(sock.accept()[0],), daemon=True).start()
socks = [socket.create_server(("0.0.0.0", int(p))) for p in sys.argv[1:]]
for sock in socks[1:]:
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
print("ready", flush=True)
serve(socks[0])
"""

# connect, then n one-byte round trips; prints the fastest in ms, or exits 1 saying why not
PING = r"""
import socket, sys, time
addr, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
try:
    sock = socket.create_connection((addr, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise OSError("no echo")
        rtts.append(time.perf_counter() - t0)
except OSError as exc:
    print(f"unreachable: {exc!r}")
    sys.exit(1)
print(f"{min(rtts) * 1000:.3f}")
"""


def _rtt_ms(hosts: Hosts, src: int, dst: int, port: int, n: int = 1, timeout: float = REACH_S):
    """The fastest of ``n`` round trips from host ``src`` to the echo server on host ``dst``
    (ms), or ``None`` when it can't be reached."""
    argv = [sys.executable, "-c", PING, hosts.addr(dst), str(port), str(n), str(timeout)]
    res = hosts.run(src, argv, timeout=timeout + 20)
    return float(res.stdout) if res.returncode == 0 else None


def _reachable(hosts: Hosts, src: int, port: int, dst: int = 2) -> bool:
    return _rtt_ms(hosts, src, dst, port) is not None


def _blocked(hosts: Hosts, src: int, port: int, dst: int = 2) -> bool:
    return _rtt_ms(hosts, src, dst, port, timeout=BLOCKED_S) is None


def _present() -> set[str]:
    """Every namespace and link name in the root namespace."""
    names = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    return names | set(os.listdir("/sys/class/net"))


@pytest.fixture(scope="module")
def hosts():
    if why := available():
        pytest.skip(why)
    with Hosts(3) as made:
        server = made.popen(
            2, [sys.executable, "-c", ECHO, *map(str, PORTS)], stdout=subprocess.PIPE
        )
        assert server.stdout.readline().strip() == b"ready"
        yield made


@pytest.fixture
def healed(hosts):
    """The module's hosts, every fault healed after the test."""
    yield hosts
    for i in range(hosts.n):
        hosts.heal(i)


def test_hosts_reach_each_other_and_root_has_no_address_on_their_subnet(hosts):
    assert [hosts.addr(i) for i in range(3)] == [str(hosts.subnet[i]) for i in (1, 2, 3)]
    assert hosts.subnet.subnet_of(ipaddress.ip_network("10.0.0.0/8"))
    assert all(len(n) <= 15 for n in (hosts.ns(2), hosts.veth(2), hosts.bridge))
    assert _reachable(hosts, 0, PORTS[0]) and _reachable(hosts, 1, PORTS[1])
    root = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    addrs = [ipaddress.ip_interface(w.split()[3]) for w in root.splitlines()]
    assert not [a for a in addrs if a.ip in hosts.subnet], addrs
    route = subprocess.run(["ip", "-o", "route", "get", hosts.addr(2)], capture_output=True)
    assert hosts.bridge.encode() not in route.stdout  # root has no way onto the bridge
    routes = hosts.run(0, ["ip", "-4", "route"]).stdout
    assert routes.split()[0] == str(hosts.subnet) and "default" not in routes


def test_link_down_partitions_a_host_and_link_up_heals_it(healed):
    hosts = healed
    hosts.link_down(0)
    hosts.link_down(0)  # idempotent
    assert _blocked(hosts, 0, PORTS[0])
    assert _reachable(hosts, 1, PORTS[0])  # the others still reach each other
    hosts.link_up(0)
    assert _reachable(hosts, 0, PORTS[0])


def test_cut_ports_drops_only_those_ports_both_ways(healed):
    hosts = healed
    hosts.cut_ports(0, [PORTS[0]])
    hosts.cut_ports(0, [PORTS[0]])  # idempotent
    assert _blocked(hosts, 0, PORTS[0])
    assert _reachable(hosts, 0, PORTS[1])
    assert _reachable(hosts, 1, PORTS[0])  # other hosts are not cut
    hosts.heal_ports(0)
    assert _reachable(hosts, 0, PORTS[0])
    # on the server's side: inbound connections to the port from other hosts are dropped,
    # while the host itself still reaches it (loopback is never cut)
    hosts.cut_ports(2, [PORTS[0]])
    assert _blocked(hosts, 1, PORTS[0])
    assert _reachable(hosts, 1, PORTS[1])
    assert _reachable(hosts, 2, PORTS[0], dst=2)
    hosts.heal_ports(2)
    hosts.heal_ports(2)  # idempotent
    assert _reachable(hosts, 1, PORTS[0])


def test_drop_loses_a_hosts_packets_and_heal_stops_it(healed):
    hosts = healed
    hosts.drop(0, 100.0)  # every packet: a connection cannot even open
    hosts.drop(0, 100.0)  # idempotent
    assert _blocked(hosts, 0, PORTS[0])
    assert _reachable(hosts, 1, PORTS[0])
    hosts.heal(0)  # heal undoes the loss too
    assert _reachable(hosts, 0, PORTS[0])
    hosts.drop(0, 100.0)
    hosts.drop(0, 0)
    assert _reachable(hosts, 0, PORTS[0])


def test_cut_all_but_keeps_only_the_allowed_ports(healed):
    hosts = healed
    hosts.cut_all_but(0, [PORTS[1]])
    hosts.cut_all_but(0, [PORTS[1]])  # idempotent
    assert _reachable(hosts, 0, PORTS[1])
    assert _blocked(hosts, 0, PORTS[0])
    assert _blocked(hosts, 0, PORTS[2])
    assert _reachable(hosts, 1, PORTS[0])
    hosts.heal_all_but(0)
    assert _reachable(hosts, 0, PORTS[0]) and _reachable(hosts, 0, PORTS[2])


def test_netem_adds_its_delay_to_the_round_trip(healed):
    if why := netem_available():
        pytest.skip(why)
    hosts = healed
    assert _rtt_ms(hosts, 0, 2, PORTS[0], n=5) < 20.0
    hosts.netem(2, delay_ms=20)
    hosts.netem(2, delay_ms=20)  # idempotent
    assert _rtt_ms(hosts, 0, 2, PORTS[0], n=5) >= 20.0
    hosts.clear_netem(2)
    hosts.clear_netem(2)
    assert _rtt_ms(hosts, 0, 2, PORTS[0], n=5) < 20.0


def test_kill_host_leaves_no_process_in_it(hosts):
    sleepers = [hosts.popen(1, ["sleep", "60"]) for _ in range(2)]
    assert len(hosts.pids(1)) == 2
    assert hosts.kill_host(1) == 2
    assert hosts.pids(1) == [] and all(p.wait(5) == -signal.SIGKILL for p in sleepers)
    assert hosts.kill_host(1) == 0  # idempotent


@pytest.mark.slow
def test_etcd_across_hosts_survives_a_member_stopped_and_takes_it_back(hosts, tmp_path):
    etcdctl = shutil.which("etcdctl")
    if etcdctl is None:
        pytest.skip("no etcdctl (apt-get install etcd-client)")

    def ctl(host: int, member: int, *args: str):
        argv = [
            etcdctl,
            f"--endpoints={etcd.members[member].endpoint}",
            "--command-timeout=3s",
            *args,
        ]
        return hosts.run(host, argv, env={**os.environ, "ETCDCTL_API": "3"})

    etcd = start_etcd(hosts, str(tmp_path))
    try:
        assert etcd.endpoints == ",".join(f"{hosts.addr(i)}:2379" for i in range(3))
        assert ctl(0, 0, "put", "/netns/k", "v1").returncode == 0
        assert ctl(2, 2, "get", "--print-value-only", "/netns/k").stdout.strip() == "v1"
        etcd.stop_member(1)
        deadline = time.monotonic() + 15  # a stopped leader: the others elect one first
        while ctl(0, 0, "put", "/netns/k", "v2").returncode != 0:
            assert time.monotonic() < deadline, "no write with one member of three stopped"
        etcd.start_member(1)
        etcd.wait_healthy(15)
        assert ctl(1, 1, "get", "--print-value-only", "/netns/k").stdout.strip() == "v2"
        assert etcd.wait_leader() in (0, 1, 2)
    finally:
        etcd.stop_all()


def test_exit_removes_everything_even_after_an_error():
    if why := available():
        pytest.skip(why)
    with pytest.raises(RuntimeError, match="boom"), Hosts(2) as made:
        names = {made.ns(0), made.ns(1), made.veth(0), made.veth(1), made.bridge}
        assert names <= _present()
        sleeper = made.popen(0, ["sleep", "60"])
        raise RuntimeError("boom")
    assert not names & _present()
    assert sleeper.wait(5) == -signal.SIGKILL


def test_cleanup_stale_removes_what_a_crashed_run_left_and_nothing_live(hosts):
    crash = (
        "import os, signal, subprocess\nfrom eep.tools.netns import Hosts\n"
        "made = Hosts(2).__enter__()\n"
        "made.popen(1, ['sleep', '60'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(made.ns(0), made.ns(1), made.veth(0), made.veth(1), made.bridge, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60)
    left = set(res.stdout.split())
    assert len(left) == 5 and left <= _present(), res.stderr
    assert left <= set(cleanup_stale())  # and whatever other dead runs left
    assert not left & _present()
    assert {hosts.ns(0), hosts.bridge} <= _present() and _reachable(hosts, 0, PORTS[0])
