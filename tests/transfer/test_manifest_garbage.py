"""A manifest read from etcd that is foreign or hand-written is a ManifestError (its readers
skip it), whatever its shape."""

from __future__ import annotations

import json

import pytest

from eep.transfer.errors import ManifestError
from eep.transfer.manifest import Manifest

GOOD = {
    "holder": "0",
    "host_id": "h",
    "endpoint": {"session": "127.0.0.1:1", "protocol": "tcp"},
    "regions": [],
    "tensors": {},
}


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[" * 50_000,
        json.dumps({**GOOD, "tensors": []}).encode(),
        json.dumps({**GOOD, "regions": {"a": 1}}).encode(),
        json.dumps({**GOOD, "endpoint": "x"}).encode(),
        json.dumps([GOOD]).encode(),
        b"\xff\xfe",
    ],
)
def test_garbage_is_a_manifest_error(raw):
    with pytest.raises(ManifestError):
        Manifest.from_json(raw, "manifests/0")
