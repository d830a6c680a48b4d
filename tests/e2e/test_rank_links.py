"""Hostile and careless peers of the front-end's rank port, and what a cluster listens on.

A live cluster under torchrun (as ``eep launch`` starts it): an impostor that says hello as
slot 0 without the cluster's secret is dropped unheard while slot 0 serves on; garbage, an
oversize length prefix, or a valid frame of the wrong type closes only its own connection;
every TCP listener of the cluster's process tree is on the loopback interface (Mooncake's,
which cannot be bound to an address, excepted by name). The handshake's time limit and the
rank side of it (a secret it cannot read, a secret other than the front-end's) run on real
sockets in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import requests

from eep.auth import create_secret, load_secret, new_nonce, proof
from eep.engine.engine import TokenEvent
from eep.frontend.links import RankLinks
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Abort,
    Challenge,
    Hello,
    Submit,
    Tokens,
    encode,
    recv_message,
)
from eep.protocol import SamplingParams as WireParams
from eep.rank.link import FrontendChanged, FrontendLink
from eep.tools import faults

from .conftest import complete, prompts_for, start_cluster

CLOSE_TIMEOUT_S = 30.0  # generous: the front-end answers at once, but the machine may be loaded


# --- helpers -------------------------------------------------------------------------------


def _wait(what: str, predicate, timeout_s: float = 60.0, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _until_closed(sock: socket.socket, timeout_s: float = CLOSE_TIMEOUT_S) -> bytes:
    """Every byte the peer sends until it closes the connection; fails if it stays open."""
    deadline, data = time.monotonic() + timeout_s, b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        except ConnectionResetError:  # closed with our bytes unread: closed all the same
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the connection was still open after {timeout_s:.0f} s ({data!r})")


def _ranks_address(client: EtcdClient, keys: Keys) -> tuple[str, int]:
    kv = client.get(keys.frontend)
    assert kv is not None, "the front-end has not registered"
    addr = kv.json()["ranks"]
    return addr["host"], int(addr["port"])


@contextlib.contextmanager
def _challenged(address: tuple[str, int]):
    """A connection to the rank port whose challenge was read: ``(socket, nonce)``."""
    sock = socket.create_connection(address, timeout=CLOSE_TIMEOUT_S)
    try:
        challenge = recv_message(sock)
        assert isinstance(challenge, Challenge), f"the front-end opened with {challenge!r}"
        assert len(challenge.nonce) >= 32
        yield sock, challenge.nonce
    finally:
        sock.close()


def _incarnation(cluster, slot: int) -> int:
    kv = cluster.client.get(cluster.keys.slot(slot))
    return json.loads(kv.value)["incarnation"]


def _pids(ss_line: str) -> set[int]:
    return {int(p.split(",")[0]) for p in ss_line.split("pid=")[1:]}


def _rank_links_now(cluster) -> set[tuple[int, str]] | None:
    """``(worker pid, local address)`` of each worker's connection to the rank port, from
    ``ss``: the same set later means no real link was dropped and remade meanwhile. None
    without ``ss``."""
    if shutil.which("ss") is None:
        return None
    host, port = _ranks_address(cluster.client, cluster.keys)
    workers = {cluster.wait_worker_pid(s) for s in range(cluster.cfg.num_slots)}
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    links = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3] == f"{host}:{port}":
            links |= {(pid, fields[2]) for pid in _pids(line) & workers}
    assert len(links) == cluster.cfg.num_slots, f"not one link per worker: {links}"
    return links


def _all_live(cluster) -> dict | None:
    state = faults.slots_state(cluster.url)
    slots = state["slots"]
    ok = all(slots[s]["live"] for s in range(cluster.cfg.num_slots))
    return state if ok else None


# --- a live cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = start_cluster(tiny_model_dir, tmp_path_factory.mktemp("links"), torchrun=True)
    try:
        _wait("every slot's link to be up", lambda: _all_live(c), timeout_s=120)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def secret(cluster) -> str:
    """The cluster's secret, read as a process of the cluster's user could."""
    assert cluster.cfg.secret_file == os.path.join(cluster.workdir, "secret")
    return load_secret(cluster.cfg.secret_file)


@pytest.mark.slow
def test_the_launcher_made_a_0600_secret_and_published_its_path(cluster):
    mode = os.stat(cluster.cfg.secret_file).st_mode & 0o777
    assert mode == 0o600
    published = json.loads(cluster.client.get(cluster.keys.config).value)
    assert published["secret_file"] == cluster.cfg.secret_file


@pytest.mark.slow
def test_an_impostor_of_slot_0_is_dropped_unheard_and_slot_0_serves_on(cluster, secret):
    address = _ranks_address(cluster.client, cluster.keys)
    inc = _incarnation(cluster, 0)
    tokens_before = faults.slots_state(cluster.url)["slots"][0]["tokens"]
    links_before = _rank_links_now(cluster)
    # (what, the proof's nonce, slot and incarnation or None for a made-up one, version)
    impostors = [
        ("a wrong proof", None, PROTOCOL_VERSION),
        ("no proof", "", PROTOCOL_VERSION),
        ("a proof replayed from another challenge", ("other", 0, inc), PROTOCOL_VERSION),
        ("slot 1's proof", ("nonce", 1, inc), PROTOCOL_VERSION),
        ("another incarnation's proof", ("nonce", 0, inc + 1), PROTOCOL_VERSION),
        ("another protocol version", ("nonce", 0, inc), PROTOCOL_VERSION + 1),
    ]

    def hello(nonce: str, made: tuple | str | None, version: int) -> Hello:
        if made is None:
            return Hello(0, inc, "0" * 64, version)
        if isinstance(made, str):
            return Hello(0, inc, made, version)
        which, slot, incarnation = made
        answered = nonce if which == "nonce" else new_nonce()
        return Hello(0, inc, proof(secret, answered, slot, incarnation), version)

    for what, made, version in impostors:
        with _challenged(address) as (sock, nonce):
            sock.sendall(encode(hello(nonce, made, version)))
            # dropped: closed, and not one byte after the challenge (no request reached it)
            assert _until_closed(sock) == b"", f"an impostor with {what} was sent something"

    # slot 0 is still its real incarnation's, and serves: a burst of requests spreads over
    # every live slot (the least loaded first), slot 0 included
    prompts = prompts_for(8)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda p: complete(cluster.url, {"prompt": p, "max_tokens": 6}), prompts)
        )
    assert all(len(r["choices"][0]["token_ids"]) == 6 for r in results)
    slot0 = faults.slots_state(cluster.url)["slots"][0]
    assert slot0["live"], slot0
    assert slot0["incarnation"] == inc == _incarnation(cluster, 0)
    assert slot0["tokens"] > tokens_before, "slot 0 served nothing after the impostors"
    assert _rank_links_now(cluster) == links_before, "a real rank's link was dropped"


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


MALFORMED = {
    "garbage bytes": _frame(b"\xc1" * 16),  # 0xc1 is never valid msgpack
    "a truncated map": _frame(b"\x83\xa4type"),
    "a frame that is not a map": _frame(msgpack.packb([1, 2, 3])),
    "an oversize length prefix": struct.pack(">I", MAX_FRAME + 1) + b"x" * 64,
    "the largest length prefix": b"\xff\xff\xff\xff",
    "an unknown message type": _frame(msgpack.packb({"type": "hello2", "slot": 0})),
    "a hello with a mistyped field": _frame(
        msgpack.packb({"type": "hello", "slot": "0", "incarnation": 1, "proof": ""})
    ),
    "a map with an int key": _frame(msgpack.packb({"type": "hello", 1: 0, "x": 0})),
    # bytes and str keys: decode raises TypeError (sorting them), not FrameError
    "a map with bytes and str keys": _frame(
        msgpack.packb({"type": "hello", b"x": 0, "y": 0}, use_bin_type=True)
    ),
    "a valid front-end frame (submit)": encode(Submit("r", [1, 2], [], WireParams(max_tokens=2))),
}
WRONG_FIRST = {"a valid tokens frame before any hello": encode(Tokens(0, [("r", 0, 5, None)]))}
WRONG_AFTER_HELLO = {"a second hello": encode(Hello(99, 1, "0" * 64))}


@pytest.mark.slow
@pytest.mark.parametrize("after_hello", [False, True], ids=["first-frame", "after-hello"])
def test_a_frame_of_the_wrong_shape_or_type_closes_only_its_own_link(cluster, secret, after_hello):
    address = _ranks_address(cluster.client, cluster.keys)
    before = _all_live(cluster)
    assert before is not None
    links_before = _rank_links_now(cluster)
    cases = {**MALFORMED, **(WRONG_AFTER_HELLO if after_hello else WRONG_FIRST)}
    for what, payload in cases.items():
        with _challenged(address) as (sock, nonce):
            if after_hello:
                # a peer that knows the secret, as a slot outside the view (never assigned
                # work), then misbehaves: the link is authenticated, the frame still drops it
                sock.sendall(encode(Hello(99, 1, proof(secret, nonce, 99, 1))) + payload)
            else:
                sock.sendall(payload)
            assert _until_closed(sock) == b"", f"{what}: the front-end answered"
    # the ranks' links were never touched: same incarnations, all live; HTTP answers
    after = _all_live(cluster)
    assert after is not None, "a rank link went down"
    assert _rank_links_now(cluster) == links_before, "a real rank's link was dropped"
    for s in range(cluster.cfg.num_slots):
        assert after["slots"][s]["incarnation"] == before["slots"][s]["incarnation"]
    assert requests.get(f"{cluster.url}/health", timeout=10).status_code == 200
    result = complete(cluster.url, {"prompt": prompts_for(1)[0], "max_tokens": 4})
    assert len(result["choices"][0]["token_ids"]) == 4


# --- what the cluster listens on -------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _tree(roots: list[int]) -> set[int]:
    children, seen, todo = _children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def _listeners() -> list[tuple[str, int, set[int]]]:
    """``(address, port, owner pids)`` of every listening TCP socket, from ``ss -ltnpH``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        host, _, port = fields[3].rpartition(":")
        host = host.strip("[]").split("%")[0]  # [::1] or 127.0.0.1%lo
        found.append((host, int(port), _pids(line)))
    return found


def _loopback(host: str) -> bool:
    if host == "*":
        return False
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.mark.slow
def test_every_listener_of_the_cluster_is_on_the_loopback_interface(cluster):
    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed: cannot list listening sockets")
    roots = [p.pid for p in cluster.procs.values()] + [cluster.etcd_server.pid]
    tree = _tree(roots)
    workers = {cluster.wait_worker_pid(s): s for s in range(cluster.cfg.num_slots)}
    assert set(workers) <= tree
    mine = [(h, port, pids & tree) for h, port, pids in _listeners() if pids & tree]

    # the sockets the cluster must have: found, so the check below is not vacuous
    ports = {port for _, port, _ in mine}
    etcd_port = int(cluster.endpoint.rpartition(":")[2])
    front = cluster.client.get(cluster.keys.frontend).json()
    for what, port in [
        ("etcd's client port", etcd_port),
        ("the front-end's HTTP port", front["http"]["port"]),
        ("the front-end's rank port", front["ranks"]["port"]),
    ]:
        assert port in ports, f"{what} ({port}) is not among the cluster's listeners: {mine}"
    for s in range(cluster.cfg.num_slots):
        agent = cluster.procs[f"slot{s}"].pid
        assert any(agent in pids for _, _, pids in mine), f"slot {s}'s torchrun agent has no store"

    # Mooncake's two ports on each CPU worker included: eep.transfer.loopback keeps its
    # wildcard binds on the loopback interface
    off_loopback = [(h, port, sorted(pids)) for h, port, pids in mine if not _loopback(h)]
    assert not off_loopback, f"listening beyond the loopback interface: {off_loopback}"
    for slot in range(cluster.cfg.num_slots):  # and the workers' transfer ports were seen
        manifest = json.loads(cluster.client.get(cluster.keys.manifest(slot)).value)
        session_port = int(manifest["endpoint"]["session"].rpartition(":")[2])
        assert session_port in ports, f"slot {slot}'s transfer port {session_port} not found"


# --- the handshake on real sockets, in this process ------------------------------------------


class _Recorder:
    def __init__(self):
        self.up: list[int] = []
        self.tokens: list[tuple] = []  # every token row received, in order

    def on_link_up(self, slot):
        self.up.append(slot)

    def on_tokens(self, slot, incarnation, msg):
        self.tokens.extend(tuple(row) for row in msg.events)

    def on_migrate_ready(self, slot, msg): ...
    def on_migrated(self, msg): ...
    def on_refused(self, slot, msg): ...


@contextlib.contextmanager
def _frontend_links(**kwargs):
    """A :class:`RankLinks` serving a real port on its own event loop thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    links = RankLinks(_Recorder(), **kwargs)

    async def start():
        return await asyncio.start_server(links.handle, "127.0.0.1", 0)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield links, server.sockets[0].getsockname()[:2], loop
    finally:

        async def stop():
            server.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_peer_that_says_nothing_is_dropped_after_the_hello_timeout(tmp_path):
    path = str(tmp_path / "secret")
    create_secret(path)
    with _frontend_links(secret_file=path, hello_timeout_s=0.5) as (_, address, _):
        started = time.monotonic()
        with _challenged(address) as (sock, _):
            assert _until_closed(sock) == b""
        assert time.monotonic() - started >= 0.45  # it was the timeout, not a refusal


def test_a_front_end_without_a_secret_refuses_every_link_before_challenging():
    with _frontend_links() as (links, address, _):
        sock = socket.create_connection(address, timeout=CLOSE_TIMEOUT_S)
        with sock:
            sock.sendall(encode(Hello(0, 1, "0" * 64)))
            assert _until_closed(sock) == b""
        assert links.incarnation(0) is None


@pytest.fixture
def etcd_keys(etcd_server):
    """A client of the session's etcd for the rank link (its thread has it to itself) and a
    cluster's keys of the test's own."""
    client, keys = EtcdClient(etcd_server.endpoint), Keys(f"t{uuid.uuid4().hex[:10]}")
    yield client, keys
    client.close()


def _publish(client: EtcdClient, keys: Keys, address: tuple[str, int]) -> None:
    ranks = {"host": address[0], "port": address[1]}
    client.put(keys.frontend, json.dumps({"http": ranks, "ranks": ranks}))


def test_a_rank_that_cannot_read_its_secret_says_why_and_connects_once_it_can(
    tmp_path, etcd_keys, caplog
):
    client, keys = etcd_keys
    front_path, rank_path = str(tmp_path / "front"), str(tmp_path / "rank")
    value = create_secret(front_path)
    with open(rank_path, "w") as f:
        f.write(value)
    os.chmod(rank_path, 0o644)  # careless: other users could read it
    caplog.set_level(logging.INFO, logger="eep.rank.link")
    with _frontend_links(secret_file=front_path) as (links, address, loop):
        _publish(client, keys, address)
        link = FrontendLink(client, keys, 5, 3, rank_path)
        try:
            _wait(
                "the rank to log that its secret is open to other users",
                lambda: any("open to other users" in r.getMessage() for r in caplog.records),
                timeout_s=30,
            )
            assert not link.connected.is_set() and links.incarnation(5) is None
            assert all(value not in r.getMessage() for r in caplog.records)  # never logged
            os.chmod(rank_path, 0o600)  # fixed while the worker runs: it retries and gets in
            _wait("the rank's link to be up", lambda: links.incarnation(5) == 3, timeout_s=30)
            loop.call_soon_threadsafe(links.send, 5, Abort("r1"))
            assert link.inbox.get(timeout=CLOSE_TIMEOUT_S) == Abort("r1")
        finally:
            link.close()


def test_a_rank_with_another_secret_is_refused_and_says_what_that_means(
    tmp_path, etcd_keys, caplog
):
    client, keys = etcd_keys
    front_path, rank_path = str(tmp_path / "front"), str(tmp_path / "rank")
    create_secret(front_path)
    create_secret(rank_path)  # another cluster's
    caplog.set_level(logging.INFO)
    with _frontend_links(secret_file=front_path) as (links, address, _):
        _publish(client, keys, address)
        link = FrontendLink(client, keys, 2, 1, rank_path)
        try:
            _wait(
                "the front-end to refuse the rank's wrong proof",
                lambda: any("wrong proof" in r.getMessage() for r in caplog.records),
                timeout_s=30,
            )
            _wait(
                "the rank to say its hello was refused",
                lambda: any("closed right after" in r.getMessage() for r in caplog.records),
                timeout_s=30,
            )
            assert links.incarnation(2) is None
        finally:
            link.close()


def _drop_link(links: RankLinks, slot: int, loop) -> None:
    """Close ``slot``'s connection from the front-end's side (the rank reconnects)."""
    _, writer = links._links[slot]
    loop.call_soon_threadsafe(writer.close)


def test_a_rank_drops_its_requests_when_another_front_end_answers_but_not_on_a_reconnect(
    tmp_path, etcd_keys
):
    client, keys = etcd_keys
    path = str(tmp_path / "secret")
    create_secret(path)
    with _frontend_links(secret_file=path) as (first, address, loop):
        _publish(client, keys, address)
        link = FrontendLink(client, keys, 4, 2, path)
        try:
            _wait("the rank's link to be up", lambda: first.handler.up == [4], timeout_s=30)
            assert link.instance == first.instance
            # the same front-end again: a reconnect, whose requests are still wanted
            _drop_link(first, 4, loop)
            _wait("the link to come back", lambda: first.handler.up == [4, 4], timeout_s=30)
            loop.call_soon_threadsafe(first.send, 4, Abort("r1"))
            assert link.inbox.get(timeout=CLOSE_TIMEOUT_S) == Abort("r1")
            # another front-end process (a restart) publishes itself: the rank is told to drop
            # what the first one sent before anything of the new one reaches it
            with _frontend_links(secret_file=path) as (second, address2, loop2):
                assert second.instance != first.instance
                _publish(client, keys, address2)
                _drop_link(first, 4, loop)
                _wait("the link to the new front-end", lambda: second.handler.up == [4])
                loop2.call_soon_threadsafe(second.send, 4, Abort("r2"))
                changed = FrontendChanged(previous=first.instance, instance=second.instance)
                assert link.inbox.get(timeout=CLOSE_TIMEOUT_S) == changed
                assert link.inbox.get(timeout=CLOSE_TIMEOUT_S) == Abort("r2")
                assert link.inbox.empty()
                link.close()  # and let the front-end see it go before its loop stops
                _wait("the link to close", lambda: second.incarnation(4) is None, timeout_s=30)
        finally:
            link.close()


def test_tokens_sent_while_the_link_is_down_reach_the_same_front_end_in_order(tmp_path, etcd_keys):
    """A link that drops and comes back to the same front-end loses nothing: that front-end
    still waits for those tokens, in order (a gap would stall the request for good). A new
    front-end instance gets none of them: its predecessor's requests are dropped."""
    client, keys = etcd_keys
    path = str(tmp_path / "secret")
    create_secret(path)
    rows = [TokenEvent("r1", i, 100 + i, None) for i in range(6)]
    with _frontend_links(secret_file=path) as (first, address, loop):
        _publish(client, keys, address)
        link = FrontendLink(client, keys, 6, 1, path)
        try:
            _wait("the rank's link to be up", lambda: first.handler.up == [6], timeout_s=30)
            assert link.send_tokens(rows[:2])
            _wait("the first tokens", lambda: len(first.handler.tokens) == 2)
            _publish(client, keys, ("127.0.0.1", 1))  # the link cannot come back yet
            _drop_link(first, 6, loop)
            _wait("the link to be down", lambda: not link.connected.is_set(), timeout_s=30)
            assert not link.send_tokens(rows[2:4])  # queued, not lost
            assert not link.send_tokens(rows[4:5])
            _publish(client, keys, address)
            _wait("the link to come back", lambda: first.handler.up == [6, 6], timeout_s=30)
            assert link.send_tokens(rows[5:])
            _wait("every token", lambda: len(first.handler.tokens) == 6)
            assert [r[1] for r in first.handler.tokens] == list(range(6)), "out of order"
            # down again with tokens queued, and another front-end answers: it gets none
            _publish(client, keys, ("127.0.0.1", 1))
            _drop_link(first, 6, loop)
            _wait("the link to be down", lambda: not link.connected.is_set(), timeout_s=30)
            assert not link.send_tokens([TokenEvent("r1", 6, 106, None)])
            with _frontend_links(secret_file=path) as (second, address2, _):
                _publish(client, keys, address2)
                _wait("the link to the new front-end", lambda: second.handler.up == [6])
                assert link.send_tokens([TokenEvent("r9", 0, 7, None)])
                _wait("the new front-end's token", lambda: second.handler.tokens)
                assert [r[0] for r in second.handler.tokens] == ["r9"]
                link.close()
                _wait("the link to close", lambda: second.incarnation(6) is None, timeout_s=30)
        finally:
            link.close()
