"""A position-weighted 64-bit checksum, computed where the bytes live.

Definition (one function, several implementations that agree bit for bit): the bytes, padded
with zeros to a multiple of 4, are read as little-endian int32 words ``v[i]`` (sign-extended);
the checksum is ``sum_i v[i] * (K * i + C) mod 2**64`` with odd ``C`` and even ``K``, so every
weight is odd. A change of one word by ``d`` (``0 < |d| < 2**33``) always changes the sum
(an odd weight times ``d`` is never ``0 mod 2**64``); moved or swapped words change it because
weights depend on the position. It detects corruption, it is not a cryptographic hash.

- :func:`checksum_reference`: torch ops on any device, one tensor (the oracle).
- :func:`range_checksums`: many byte ranges of one buffer (a pull's batch, a manifest's
  tensors) in one computation. On CUDA one launch of the batched Triton kernel
  (``eep.kernels.checksum``), the ranges cut into pieces whose partial sums are added on the
  device; on the CPU the sums of 64-word blocks as float64 matrix products (exact below
  ``2**53``), each range's value from prefix sums of its blocks. No host sync on CUDA.
- :func:`checksum_triton`: one tensor through the same kernel.
- ``numpy`` in the tests, with explicit unsigned wrap-around, checks them all.

The text form is ``w64-<16 hex digits>`` (:func:`format_checksum`, :func:`parse_checksum`); the
byte count is kept beside it in the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALGORITHM = "w64"
_MASK = (1 << 64) - 1
K_WEIGHT = (2 * 0x9E3779B97F4A7C15) & _MASK  # even: weights K*i + C stay odd
C_WEIGHT = (2 * 0x2545F4914F6CDD1D + 1) & _MASK  # odd
_CHUNK_WORDS = 1 << 22  # torch path: 16 MiB of input per step, bounded temporaries


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


_BLOCK_WORDS = 64  # CPU batch path: 256-byte blocks (the arena alignment)
_PIECE_BLOCKS = 4096  # 1 MiB of input per matrix product: its float64 copy stays in cache
# ``[64, 2]`` float64: a block's words times these give (sum of words, sum of word x position)
_BLOCK_WEIGHTS = torch.stack(
    [
        torch.ones(_BLOCK_WORDS, dtype=torch.float64),
        torch.arange(_BLOCK_WORDS, dtype=torch.float64),
    ],
    1,
)


def _block_sums(words: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """Per 64-word block ``b`` of ``words`` (``[64 R]`` int32): ``out[b] = (sum_c v[b, c],
    sum_c c * v[b, c])`` (``out``: ``[R, 2]`` float64), as one float64 matrix product per piece.

    Exact: every product and partial sum is an integer below ``64 * 63 * 2**31 < 2**53``, which
    float64 holds exactly whatever order the product adds in.
    """
    blocks = words.view(-1, _BLOCK_WORDS)
    for r in range(0, blocks.shape[0], _PIECE_BLOCKS):
        n = min(_PIECE_BLOCKS, blocks.shape[0] - r)
        piece = scratch[:n]
        piece.copy_(blocks[r : r + n])
        torch.mm(piece, _BLOCK_WEIGHTS, out=out[r : r + n])


def _runs(offsets: torch.Tensor, nbytes: torch.Tensor):
    """Ranges (``[m]`` int64 byte offsets and sizes) grouped into runs that lie back to back in
    whole blocks. Returns ``order`` (the ranges by offset), ``run_of`` (each sorted range's run)
    and ``starts``, ``ends`` (each run's byte range), all int64 tensors."""
    order = torch.argsort(offsets, stable=True)
    off, nb = offsets[order], nbytes[order]
    joins = torch.zeros_like(off, dtype=torch.bool)
    joins[1:] = (off[1:] == off[:-1] + nb[:-1]) & (nb[:-1] % (4 * _BLOCK_WORDS) == 0)
    last = torch.ones_like(joins)
    last[:-1] = ~joins[1:]
    return order, torch.cumsum(~joins, 0) - 1, off[~joins], (off + nb)[last]


def _ranges_blocked(buffer: torch.Tensor, offsets: Sequence[int], nbytes: Sequence[int]):
    """:func:`range_checksums` on the CPU: block sums over every run of ranges (one pass over
    the bytes, a few torch ops per MiB), then every range's sum from prefix sums of its blocks;
    what is left of a range past its last whole block goes through the reference."""
    sums = torch.zeros(len(offsets), dtype=torch.int64)
    offs = torch.tensor(offsets, dtype=torch.int64)
    nb = torch.tensor(nbytes, dtype=torch.int64)
    aligned = offs % 4 == 0
    if buffer.data_ptr() % 4:
        aligned[:] = False
    picked = torch.nonzero(aligned).flatten()
    order, run_of, starts, ends = _runs(offs[picked], nb[picked])
    block_bytes = 4 * _BLOCK_WORDS
    run_blocks = (ends - starts) // block_bytes
    run_first = torch.cumsum(run_blocks, 0) - run_blocks
    total = int(run_blocks.sum())
    block = torch.empty(total, 2, dtype=torch.float64)
    scratch = torch.empty(min(total, _PIECE_BLOCKS), _BLOCK_WORDS, dtype=torch.float64)
    for s, n, f in zip(starts.tolist(), run_blocks.tolist(), run_first.tolist(), strict=True):
        if n:
            words = buffer[s : s + n * block_bytes].view(torch.int32)
            _block_sums(words, block[f : f + n], scratch)
    # a range's whole blocks are [first, first + count) of ``block``; its words weigh from 0
    idx = picked[order]
    first = run_first[run_of] + (offs[idx] - starts[run_of]) // block_bytes
    end = first + nb[idx] // block_bytes
    exact = block.to(torch.int64)
    ramp = torch.arange(total, dtype=torch.int64) * _BLOCK_WORDS
    s0 = _prefix(exact[:, 0])
    s1 = _prefix(ramp * exact[:, 0] + exact[:, 1])
    part0 = s0[end] - s0[first]
    part1 = s1[end] - s1[first] - first * _BLOCK_WORDS * part0
    sums[idx] = part0 * _signed(C_WEIGHT) + part1 * _signed(K_WEIGHT)
    for i in torch.nonzero(~aligned | (nb % block_bytes != 0)).flatten().tolist():
        sums[i] += _rest(buffer, offsets[i], nbytes[i], bool(aligned[i]))
    return sums


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """``[n]`` -> ``[n + 1]`` prefix sums from 0 (int64, wrapping)."""
    out = torch.zeros(x.numel() + 1, dtype=torch.int64)
    torch.cumsum(x, 0, out=out[1:])
    return out


def _rest(buffer: torch.Tensor, offset: int, nbytes: int, aligned: bool) -> torch.Tensor:
    """The part of one range's checksum its whole blocks left out (all of it if unaligned)."""
    done = nbytes // (4 * _BLOCK_WORDS) * 4 * _BLOCK_WORDS if aligned else 0
    words, tail = _split_words(buffer[offset + done : offset + nbytes])
    total = _weighted_sum_torch(words, done // 4)
    if tail is not None:
        total += _weighted_sum_torch(tail, done // 4 + words.numel())
    return total


def range_checksums(
    buffer: torch.Tensor, offsets: Sequence[int], nbytes: Sequence[int]
) -> torch.Tensor:
    """Checksums of many byte ranges of one buffer, as ``[m]`` int64 on the buffer's device.

    ``buffer``: ``[N]`` uint8, contiguous (an arena's); range ``i`` is
    ``buffer[offsets[i] : offsets[i] + nbytes[i]]``. Each value is bit for bit the
    :func:`checksum` of that range. One computation for the whole batch: on CUDA one launch
    of the batched Triton kernel, on the CPU block sums by matrix products over runs of
    neighbouring ranges; no host synchronisation on CUDA (the caller reads the values back
    once, e.g. with ``.tolist()``).
    """
    if len(offsets) != len(nbytes):
        raise ValueError("offsets and nbytes must have the same length.")
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError("range_checksums needs a contiguous 1-D uint8 buffer (an arena's).")
    if buffer.is_cuda:
        return _ranges_triton(buffer, offsets, nbytes)
    return _ranges_blocked(buffer, offsets, nbytes)


def parse_checksum(text: str) -> int | None:
    """``w64-<hex>`` -> the value as a signed int64 (what :func:`range_checksums` holds);
    ``None`` for anything else (a foreign manifest's entry matches no bytes)."""
    prefix = f"{ALGORITHM}-"
    if not isinstance(text, str) or not text.startswith(prefix) or len(text) != len(prefix) + 16:
        return None
    try:
        return _signed(int(text[len(prefix) :], 16))
    except ValueError:
        return None


def _piece_table(word_starts: torch.Tensor, word_counts: torch.Tensor, piece_words: int):
    """Ranges ``[m]`` int64 (first word, word count) -> (``[3, P]`` int64 rows start, first,
    length: each range cut into pieces of at most ``piece_words``; ``[P]`` int64 range index)."""
    counts = (word_counts + piece_words - 1) // piece_words
    idx = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    before = torch.cumsum(counts, 0) - counts
    first = (torch.arange(idx.numel()) - before[idx]) * piece_words
    length = torch.clamp(word_counts[idx] - first, max=piece_words)
    return torch.stack([word_starts[idx] + first, first, length]), idx


def _triton_sums(words: torch.Tensor, word_starts: list[int], word_counts: list[int]):
    """``[m]`` int64 checksums (full words only) of word ranges of ``words``, in one launch of
    the batched kernel (``eep.kernels.checksum``); no host synchronisation."""
    from eep.kernels.checksum import PIECE_WORDS, range_checksum_partials

    starts = torch.tensor(word_starts, dtype=torch.int64)
    counts = torch.tensor(word_counts, dtype=torch.int64)
    pieces, idx = _piece_table(starts, counts, PIECE_WORDS)
    dev = words.device
    # one pageable host-to-device copy of the table: staged, no wait on the device's queue
    table = torch.cat([pieces, idx[None]]).to(dev, non_blocking=True)
    partial = range_checksum_partials(words, table[:3], _signed(K_WEIGHT), _signed(C_WEIGHT))
    sums = torch.zeros(len(word_starts), dtype=torch.int64, device=dev)
    return sums.index_add_(0, table[3], partial)  # integer adds: any order, the same bits


def checksum_triton(t: torch.Tensor) -> torch.Tensor:
    """The checksum of ``t``'s bytes as a 0-dim int64 device tensor, by the Triton kernel.

    ``t``: any contiguous CUDA tensor (or a CPU tensor under ``TRITON_INTERPRET=1``).
    No host synchronisation: the partial sums are reduced on the device.
    """
    words, tail = _split_words(as_bytes(t))
    total = _triton_sums(words, [0], [words.numel()])[0]
    if tail is not None:
        total += _weighted_sum_torch(tail, words.numel())
    return total


def _ranges_triton(buffer: torch.Tensor, offsets: Sequence[int], nbytes: Sequence[int]):
    """:func:`range_checksums` by the batched kernel: one launch for every word-aligned range;
    a range's last bytes past a multiple of 4, or a range that starts off a word boundary,
    are added by torch ops on the device (neither occurs in an arena of ``ALIGN`` offsets)."""
    whole = buffer.data_ptr() % 4 == 0
    aligned = [whole and o % 4 == 0 for o in offsets]
    words = buffer[: buffer.numel() // 4 * 4].view(torch.int32) if whole else buffer[:0]
    sums = _triton_sums(
        words.view(torch.int32),
        [o // 4 if a else 0 for o, a in zip(offsets, aligned, strict=True)],
        [n // 4 if a else 0 for n, a in zip(nbytes, aligned, strict=True)],
    )
    for i, (o, n, a) in enumerate(zip(offsets, nbytes, aligned, strict=True)):
        if not a:
            sums[i] = checksum_triton(buffer[o : o + n])
        elif n % 4:
            _, tail = _split_words(buffer[o + n // 4 * 4 : o + n])
            sums[i] += _weighted_sum_torch(tail, n // 4)
    return sums


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
