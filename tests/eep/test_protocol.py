"""The rank <-> front-end protocol: every message survives a frame, and malformed frames are
refused with a FrameError that names the problem."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

import msgpack
import pytest

from eep.protocol import (
    MESSAGES,
    PROTOCOL_VERSION,
    Abort,
    Challenge,
    FrameError,
    Hello,
    KvHandoff,
    Migrated,
    MigrateOut,
    MigrateReady,
    Refused,
    Release,
    SamplingParams,
    Submit,
    Tokens,
    decode,
    encode,
    recv_message,
)

KV = KvHandoff(holder="2", blocks=[4, 5], checksums=["w64-1a", "w64-2b"], num_computed=20)
EXAMPLES = [
    Challenge("00ff", "1a2b3c4d5e6f7a8b"),
    Hello(1, 7, "ab12"),
    Refused("r1", "prompt too long"),
    Tokens(0, [("r1", 0, 42, None), ("r2", 3, 7, "length")]),
    MigrateReady("r1", 2, KV, [1, 2, 3]),
    MigrateReady("r1", 2),
    Migrated("r1", True),
    Submit("r1", [1, 2, 3], [9], SamplingParams(max_tokens=4, temperature=0.5, seed=3)),
    Submit("r1", [1], [], SamplingParams(stop_token_ids=(5, 6)), KV),
    Abort("r1"),
    MigrateOut("r1", 3),
    Release("r1"),
]


def _body(frame: bytes) -> bytes:
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    return frame[4:]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert decode(_body(encode(msg))) == msg


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(MESSAGES.values())


def test_hello_carries_the_protocol_version():
    raw = msgpack.unpackb(_body(encode(Hello(0, 1))))
    assert raw == {
        "type": "hello",
        "slot": 0,
        "incarnation": 1,
        "proof": "",
        "version": PROTOCOL_VERSION,
    }


def test_a_challenge_names_the_front_end_instance():
    raw = msgpack.unpackb(_body(encode(Challenge("00ff", "beef"))))
    assert raw == {"type": "challenge", "nonce": "00ff", "instance": "beef"}


def _frame(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "obj, says",
    [
        ({"type": "nope"}, "unknown message type 'nope'"),
        ([1, 2], "must hold a map"),
        ({"type": "abort"}, "abort"),  # missing id
        ({"type": "abort", "id": "r", "extra": 1}, "unknown fields ['extra']"),
        ({"type": "abort", "id": "r", b"raw": 1, "q": 2}, "unknown fields [\"b'raw'\", 'q']"),
        ({"type": "hello", "slot": "1", "incarnation": 2}, "hello.slot: expected int"),
        # a challenge must name its front-end's instance (how a rank tells a restart)
        ({"type": "challenge", "nonce": "00ff"}, "instance"),
        ({"type": "challenge", "nonce": "00ff", "instance": 7}, "challenge.instance"),
        ({"type": "hello", "slot": True, "incarnation": 2}, "hello.slot: expected int"),
        ({"type": "migrated", "id": "r", "ok": 1}, "migrated.ok: expected bool"),
        ({"type": "tokens", "slot": 0, "events": [["r", 0, 1]]}, "expected 4 items"),
        ({"type": "tokens", "slot": 0, "events": [["r", 0, 1, 5]]}, "events[0][3]"),
        (
            {
                "type": "request",
                "id": "r",
                "prompt": [1],
                "emitted": [],
                "params": {"max_tokens": 0},
            },
            "max_tokens must be >= 1",
        ),
    ],
)
def test_malformed_frames_are_refused_by_name(obj, says):
    with pytest.raises(FrameError, match=None) as err:
        decode(_frame(obj))
    assert says in str(err.value)


def test_garbage_is_a_frame_error():
    with pytest.raises(FrameError, match="undecodable"):
        decode(b"\xc1")


def test_messages_over_a_socket_pair():
    a, b = socket.socketpair()
    with a, b:
        for msg in EXAMPLES:
            a.sendall(encode(msg))
        got = [recv_message(b) for _ in EXAMPLES]
        a.close()
        assert got == EXAMPLES
        assert recv_message(b) is None  # closed


def test_the_front_end_does_not_import_torch():
    code = (
        "import sys, eep.frontend.server, eep.tools.frontend, eep.model.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
