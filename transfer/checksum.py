"""A position-weighted 64-bit checksum, computed where the bytes live.

Definition (one function, three implementations that agree bit for bit): the bytes, padded
with zeros to a multiple of 4, are read as little-endian int32 words ``v[i]`` (sign-extended);
the checksum is ``sum_i v[i] * (K * i + C) mod 2**64`` with odd ``C`` and even ``K``, so every
weight is odd. A change of one word by ``d`` (``0 < |d| < 2**33``) always changes the sum
(an odd weight times ``d`` is never ``0 mod 2**64``); moved or swapped words change it because
weights depend on the position. It detects corruption, it is not a cryptographic hash.

- :func:`checksum_reference`: torch ops on any device (the oracle, and the CPU path).
- ``_checksum_kernel``: a Triton kernel for CUDA tensors; one pass over the bytes at memory
  bandwidth, per-program partial sums reduced on the device, no host round trip of the data.
- ``numpy`` in the tests, with explicit unsigned wrap-around, checks both.

The text form is ``w64-<16 hex digits>``; the byte count is kept beside it in the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALGORITHM = "w64"
_MASK = (1 << 64) - 1
K_WEIGHT = (2 * 0x9E3779B97F4A7C15) & _MASK  # even: weights K*i + C stay odd
C_WEIGHT = (2 * 0x2545F4914F6CDD1D + 1) & _MASK  # odd
_CHUNK_WORDS = 1 << 22  # torch path: 16 MiB of input per step, bounded temporaries
_BLOCK = 2048
_ITERS = 16


def _signed(x: int) -> int:
    """``x mod 2**64`` as the int64 with the same bits."""
    x &= _MASK
    return x - (1 << 64) if x >= 1 << 63 else x


def format_checksum(value: int) -> str:
    return f"{ALGORITHM}-{value & _MASK:016x}"


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a contiguous tensor's bytes."""
    if not t.is_contiguous():
        raise ValueError("checksum needs a contiguous tensor; call .contiguous() first.")
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _split_words(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[n]`` uint8 -> (``[n // 4]`` int32 words, the zero-padded tail word or None)."""
    n_main = data.numel() // 4 * 4
    main = data[:n_main]
    if main.numel() and main.data_ptr() % 4 == 0:
        words = main.view(torch.int32)
    else:
        words = main.clone().view(torch.int32)
    tail = None
    if n_main < data.numel():
        pad = torch.zeros(4, dtype=torch.uint8, device=data.device)
        pad[: data.numel() - n_main] = data[n_main:]
        tail = pad.view(torch.int32)
    return words, tail


def _weighted_sum_torch(words: torch.Tensor, start: int) -> torch.Tensor:
    """``sum_i words[i] * (K * (start + i) + C)`` as a 0-dim int64 tensor (wrapping)."""
    dev = words.device
    total = torch.zeros((), dtype=torch.int64, device=dev)
    if words.numel() == 0:
        return total
    n_chunk = min(_CHUNK_WORDS, words.numel())
    j = torch.arange(n_chunk, dtype=torch.int64, device=dev)
    v = torch.empty(n_chunk, dtype=torch.int64, device=dev)
    prod = torch.empty(n_chunk, dtype=torch.int64, device=dev)
    k = _signed(K_WEIGHT)
    for s in range(0, words.numel(), n_chunk):
        n = min(n_chunk, words.numel() - s)
        vs, ps = v[:n], prod[:n]
        vs.copy_(words[s : s + n])
        s0 = vs.sum()
        torch.mul(vs, j[:n], out=ps)
        s1 = ps.sum()
        # weight of word s+j is K*s + C + K*j: sum = (K*s + C)*S0 + K*S1, all mod 2**64
        total += s0 * _signed(K_WEIGHT * (start + s) + C_WEIGHT) + s1 * k
    return total


def checksum_reference(t: torch.Tensor) -> torch.Tensor:
    """The checksum of ``t``'s bytes as a 0-dim int64 tensor on ``t``'s device (torch ops)."""
    words, tail = _split_words(as_bytes(t))
    total = _weighted_sum_torch(words, 0)
    if tail is not None:
        total += _weighted_sum_torch(tail, words.numel())
    return total


def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _checksum_kernel(
        words_ptr,
        partial_ptr,
        n_words,
        k_weight,
        c_weight,
        BLOCK: tl.constexpr,
        ITERS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * (BLOCK * ITERS)
        acc = tl.zeros([BLOCK], dtype=tl.int64)
        for it in range(ITERS):
            idx = base + it * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            mask = idx < n_words
            v = tl.load(words_ptr + idx, mask=mask, other=0).to(tl.int64)
            acc += v * (idx * k_weight + c_weight)
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))

    return _checksum_kernel


_KERNEL = None


def checksum_triton(t: torch.Tensor) -> torch.Tensor:
    """The checksum of ``t``'s bytes as a 0-dim int64 device tensor, by the Triton kernel.

    ``t``: any contiguous CUDA tensor (or a CPU tensor under ``TRITON_INTERPRET=1``).
    No host synchronisation: the partial sums are reduced on the device.
    """
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _triton_kernel()
    words, tail = _split_words(as_bytes(t))
    n = words.numel()
    grid = max(1, -(-n // (_BLOCK * _ITERS)))
    partial = torch.empty(grid, dtype=torch.int64, device=words.device)
    if n:
        _KERNEL[(grid,)](
            words, partial, n, _signed(K_WEIGHT), _signed(C_WEIGHT), BLOCK=_BLOCK, ITERS=_ITERS
        )
    else:
        partial.zero_()
    total = partial.sum()
    if tail is not None:
        total += _weighted_sum_torch(tail, n)
    return total


def checksum_tensor(t: torch.Tensor) -> torch.Tensor:
    """The checksum as a 0-dim int64 tensor: the Triton kernel on CUDA, torch ops elsewhere."""
    if t.is_cuda:
        return checksum_triton(t)
    return checksum_reference(t)


def checksum(t: torch.Tensor) -> str:
    """The checksum of one tensor's bytes, as ``w64-<hex>`` (one 8-byte host read)."""
    return format_checksum(int(checksum_tensor(t).item()))


def checksums(tensors: Sequence[torch.Tensor]) -> list[str]:
    """Checksums of many tensors with one host synchronisation per device."""
    if not tensors:
        return []
    values = torch.stack([checksum_tensor(t).to(tensors[0].device) for t in tensors])
    return [format_checksum(v) for v in values.cpu().tolist()]
