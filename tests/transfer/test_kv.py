"""KV blocks migrated between two real processes arrive byte-identical and verified."""

from __future__ import annotations

import pytest

from eep.tools.holder_proc import spec_tensors


def test_kv_blocks_migrated_between_processes_are_byte_identical(holders):
    kw = dict(kv_blocks=16, kv_block_nbytes=64 << 10)
    a = holders.start("0", spec_tensors(1, 4096), **kw)
    b = holders.start("1", spec_tensors(1, 4096), **kw)
    holders.wait_ready(a, b)
    src, dst = [3, 4, 5, 9, 1], [0, 1, 2, 7, 15]
    sent = a.call("kv_fill", src, "req-42")
    record = a.call("kv_push", "1", src, dst)
    assert record.checksums == tuple(sent)
    assert b.call("kv_verify", record) == tuple(sent)
    assert b.call("kv_bytes", dst) == a.call("kv_bytes", src)


def test_kv_block_corrupted_after_migration_fails_verification(holders):
    kw = dict(kv_blocks=8, kv_block_nbytes=4096)
    a = holders.start("0", spec_tensors(1, 4096), **kw)
    b = holders.start("1", spec_tensors(1, 4096), **kw)
    holders.wait_ready(a, b)
    a.call("kv_fill", [0, 1], "req-7")
    record = a.call("kv_push", "1", [0, 1], [2, 3])
    b.call("kv_fill", [3], "someone-else")  # overwrite one delivered block
    with pytest.raises(RuntimeError, match="ChecksumMismatch.*kv block 3"):
        b.call("kv_verify", record)
