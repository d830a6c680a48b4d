"""The batched checksum kernel: position-weighted 64-bit sums of many word ranges of one buffer
in one launch (the definition is ``eep.transfer.checksum``'s; this module knows only words).

The caller cuts every range into pieces of at most :data:`PIECE_WORDS` words and passes one row
per piece; each program sums one piece, ``sum_j v[start + j] * (K * (first + j) + C)`` over
``j < length`` (``first``: the piece's word index within its range), wrapping mod ``2**64``.
The caller adds the pieces of each range on the device (integer adds, so any order gives the
same bits). Nothing here reads a value back to the host.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 2048
ITERS = 16
PIECE_WORDS = BLOCK * ITERS  # words one program sums: 128 KiB of input


@triton.jit
def _range_checksum_kernel(
    words_ptr,
    piece_start_ptr,
    piece_first_ptr,
    piece_len_ptr,
    partial_ptr,
    k_weight,
    c_weight,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    start = tl.load(piece_start_ptr + pid)
    first = tl.load(piece_first_ptr + pid)
    length = tl.load(piece_len_ptr + pid)
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for it in range(ITERS):
        j = it * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < length
        v = tl.load(words_ptr + start + j, mask=mask, other=0).to(tl.int64)
        acc += v * ((first + j) * k_weight + c_weight)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


def range_checksum_partials(
    words: torch.Tensor, pieces: torch.Tensor, k_weight: int, c_weight: int
) -> torch.Tensor:
    """One launch over every piece; returns ``[P]`` int64 partial sums on ``words``' device.

    ``words``: ``[N]`` int32, the whole buffer. ``pieces``: ``[3, P]`` int64 on the same device,
    rows ``start`` (word index into ``words``), ``first`` (index of that word within its range)
    and ``length`` (``<= PIECE_WORDS``). ``k_weight``, ``c_weight``: the weights as signed int64.
    """
    num = pieces.shape[1]
    partial = torch.empty(num, dtype=torch.int64, device=words.device)
    if num:
        # Triton launches on the calling thread's current device, which in a verifying thread
        # is cuda:0 whatever GPU the arena is on
        with torch.cuda.device(words.device) if words.is_cuda else contextlib.nullcontext():
            _range_checksum_kernel[(num,)](
                words, pieces[0], pieces[1], pieces[2], partial, k_weight, c_weight,
                BLOCK=BLOCK, ITERS=ITERS,
            )  # fmt: skip
    return partial
