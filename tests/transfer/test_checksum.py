"""The checksum: torch reference and Triton kernel against a numpy oracle."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from eep.transfer.checksum import (
    C_WEIGHT,
    K_WEIGHT,
    checksum,
    checksum_reference,
    checksums,
    format_checksum,
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


_INTERPRET_SCRIPT = """
import torch
from eep.transfer.checksum import checksum_reference, checksum_triton
for n in (0, 3, 4, 4099, 2048 * 16 * 3 + 5):
    x = torch.randint(0, 256, (n,), dtype=torch.uint8)
    assert checksum_triton(x).item() == checksum_reference(x).item(), n
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
def test_triton_kernel_matches_reference_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from eep.transfer.checksum import checksum_triton

    for n in (1, 4, 4097, 64 << 20, (256 << 20) + 3):
        x = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
        assert checksum_triton(x).item() == checksum_reference(x).item(), n
        assert checksum(x) == checksum(x.cpu())
