"""The checksum: torch reference, the batched CPU path and the Triton kernels against a numpy
oracle; a batch of ranges gives, range by range, what the per-tensor checksum gives."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from eep.transfer.arena import ArenaLayout
from eep.transfer.checksum import (
    C_WEIGHT,
    K_WEIGHT,
    checksum,
    checksum_reference,
    checksums,
    format_checksum,
    parse_checksum,
    range_checksums,
)


def _oracle(data: bytes) -> str:
    words = np.frombuffer(data + b"\0" * (-len(data) % 4), dtype="<i4")
    v = words.astype(np.int64).astype(np.uint64)
    i = np.arange(len(v), dtype=np.uint64)
    with np.errstate(over="ignore"):
        return format_checksum(
            int((v * (i * np.uint64(K_WEIGHT) + np.uint64(C_WEIGHT))).sum(dtype=np.uint64))
        )


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 4096, 100_003, (1 << 22) * 4 + 13])
def test_reference_matches_the_numpy_oracle(n):
    x = torch.randint(0, 256, (n,), dtype=torch.uint8)
    assert checksum(x) == _oracle(x.numpy().tobytes())


def test_any_single_changed_byte_or_swapped_words_change_the_checksum():
    x = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    base = checksum(x)
    for pos in (0, 1, 12345, (1 << 16) - 1):
        y = x.clone()
        y[pos] ^= 0x01
        assert checksum(y) != base
    y = x.clone().view(torch.int32)
    y[[10, 20]] = y[[20, 10]]
    if not torch.equal(y.view(torch.uint8), x):
        assert checksum(y) != base


def test_typed_tensors_and_batches_agree_with_single_checksums():
    ts = [torch.randn(33, 17), torch.randn(5).to(torch.bfloat16), torch.arange(9)]
    assert checksums(ts) == [checksum(t) for t in ts]
    assert checksum(ts[0]) == _oracle(ts[0].numpy().tobytes())


def _per_tensor(buf: torch.Tensor, offsets, sizes) -> list[str]:
    return [checksum(buf[o : o + n]) for o, n in zip(offsets, sizes, strict=True)]


def _batch(buf: torch.Tensor, offsets, sizes) -> list[str]:
    return [format_checksum(v) for v in range_checksums(buf, offsets, sizes).tolist()]


def test_a_batch_over_an_arena_equals_the_per_tensor_checksums():
    gen = torch.Generator().manual_seed(7)
    shapes = [(int(torch.randint(1, 9, (), generator=gen)) * 64,) for _ in range(40)]
    layout = ArenaLayout.pack([(f"t{i}", "float32", s) for i, s in enumerate(shapes)])
    buf = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, generator=gen)
    specs = list(layout.specs)
    for chosen in (specs, specs[::3], specs[5:9], list(reversed(specs[10:30]))):
        offsets, sizes = [s.offset for s in chosen], [s.nbytes for s in chosen]
        assert _batch(buf, offsets, sizes) == _per_tensor(buf, offsets, sizes)


def test_a_batch_of_odd_ranges_equals_the_per_tensor_checksums():
    """Sizes off the 256-byte block and the word, offsets off the word, empty, repeated and
    overlapping ranges, a buffer whose start is off the word: all still exact."""
    gen = torch.Generator().manual_seed(11)
    buf = torch.randint(0, 256, (300_001,), dtype=torch.uint8, generator=gen)
    offsets = [0, 256, 768, 771, 1000, 4096, 4096, 5000, 9999, 70_000, 70_256, 200_000]
    sizes = [256, 512, 3, 1, 0, 8192, 8192, 4099, 1, 256, 65_536 + 7, 100_001]
    assert _batch(buf, offsets, sizes) == _per_tensor(buf, offsets, sizes)
    shifted = buf[1:]
    assert _batch(shifted, offsets[:6], sizes[:6]) == _per_tensor(shifted, offsets[:6], sizes[:6])
    assert range_checksums(buf, [], []).numel() == 0


def test_a_batch_of_extreme_words_matches_the_numpy_oracle():
    words = torch.tensor([-(2**31), 2**31 - 1, -1, 0] * (1 << 16), dtype=torch.int32)
    buf = words.view(torch.uint8)
    offsets, sizes = [0, 256, 1024], [buf.numel(), 4096, 512 * 1024]
    pairs = zip(offsets, sizes, strict=True)
    expected = [_oracle(buf[o : o + n].numpy().tobytes()) for o, n in pairs]
    assert _batch(buf, offsets, sizes) == expected


def test_manifest_text_parses_back_to_the_batch_value():
    x = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    (value,) = range_checksums(x, [0], [4096]).tolist()
    assert parse_checksum(checksum(x)) == value
    for bad in ("", "w64-", "w64-xyz0123456789abc", "crc-0123456789abcdef", "w64-0123", None):
        assert parse_checksum(bad) is None


_INTERPRET_SCRIPT = """
import torch
from eep.transfer.checksum import (
    _ranges_triton, checksum, checksum_reference, checksum_triton, format_checksum,
)
for n in (0, 3, 4, 4099, 2048 * 16 * 3 + 5):
    x = torch.randint(0, 256, (n,), dtype=torch.uint8)
    assert checksum_triton(x).item() == checksum_reference(x).item(), n
buf = torch.randint(0, 256, (2048 * 16 * 4 * 3 + 64,), dtype=torch.uint8)
offsets, sizes = [0, 4, 1001, 2048 * 16 * 4, 64], [2048 * 16 * 4 * 2 + 12, 0, 7, 4096, 256]
got = [format_checksum(v) for v in _ranges_triton(buf, offsets, sizes).tolist()]
assert got == [checksum(buf[o : o + n]) for o, n in zip(offsets, sizes)], got
print("ok")
"""


def test_triton_kernel_matches_reference_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _INTERPRET_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.gpu
def test_a_batch_on_the_gpu_is_one_computation_without_a_host_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    buf = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8)
    offsets = [0, 3 << 20, (3 << 20) + 4, 9 << 20, 10 << 20, (20 << 20) + 1, 40 << 20]
    sizes = [3 << 20, 4, 6 << 20, 256, (10 << 20) + 3, 999, 24 << 20]
    expected = _batch(buf, offsets, sizes)
    dev = buf.cuda()
    range_checksums(dev, offsets, sizes)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        values = range_checksums(dev, offsets, sizes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [format_checksum(v) for v in values.tolist()] == expected


@pytest.mark.gpu
def test_triton_kernel_matches_reference_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from eep.transfer.checksum import checksum_triton

    for n in (1, 4, 4097, 64 << 20, (256 << 20) + 3):
        x = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
        assert checksum_triton(x).item() == checksum_reference(x).item(), n
        assert checksum(x) == checksum(x.cpu())
