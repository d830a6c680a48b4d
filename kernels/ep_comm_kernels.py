"""Triton bodies of dispatch and combine within one host (peer buffers addressed by pointer).

Protocol of one step (``S`` slots, ``L`` local experts per slot, ``C`` max tokens, ``K`` top-k):
1. ``_dispatch_send_kernel`` (grid ``[S * L, hidden blocks]``, one program per physical expert
   ``p`` and column block): lists the sender's ``(t, k)`` entries routed to ``p`` in flat order,
   stores their rows straight into slot ``p // L``'s ``recv_x[p % L, src * C + i]`` (plus the
   flat index and weight), then the last program done for a destination raises that
   destination's flag ``dispatch_flag[src] = (epoch << 32) | step``.
2. ``_wait_kernel`` (one program) spins on the flags of every slot expected to send, bounded
   by ``timeout_ns``; a live-marked sender that never arrives is flagged suspect and its rows
   are ignored; a flag carrying a newer epoch abandons the step at once.
3. ``_combine_send_kernel`` stores each expert output row back into its source's
   ``combine_buf[t * K + k]`` and raises ``combine_flag[me]``; ``_wait_kernel`` again; then
   ``_combine_reduce_kernel`` sums ``w[t, k] * row`` in ``k`` order in float32.

Cross-rank hazards: the flag is raised only after a CTA barrier and a system-scope release, so
a receiver that acquires the flag sees every row. Buffers are single: a sender can reach step
``N + 1`` only after every live slot's combine flag of step ``N``, which each slot raises only
after its expert GEMM consumed the step-``N`` rows. A suspect that is merely slow may still
store into a buffer later; its step is discarded by the runtime (straddling step).

``ELASTIC=False`` drops the mask, epoch and timeout logic (the overhead measurement).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Wait outcome per slot: the values of ``state`` in ``_wait_flags``.
WAITING, ARRIVED, TIMED_OUT, ABANDONED, NOT_EXPECTED = 0, 1, 2, 3, 4
# Bits of the status word.
STATUS_TIMEOUT, STATUS_NEWER_EPOCH = 1, 2


@triton.jit
def _make_tag(epoch, step):
    return (epoch.to(tl.int64) << 32) | step.to(tl.int64)


@triton.jit
def _now_ns(USE_GLOBALTIMER: tl.constexpr):
    if USE_GLOBALTIMER:
        return tl.extra.cuda.globaltimer()
    else:
        return tl.zeros((), tl.int64)


@triton.jit
def _raise_when_last(done_ptr, flag_ptr, tag, raise_it, NUM_PROGRAMS: tl.constexpr):
    """Counts this program done; the last of ``NUM_PROGRAMS`` resets the counter and, if
    ``raise_it``, publishes ``tag`` at ``flag_ptr`` (a peer's flag word) with release
    semantics at system scope, after every program's stores."""
    tl.debug_barrier()
    done = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="sys")
    if done == NUM_PROGRAMS - 1:
        tl.store(done_ptr, 0)
        if raise_it:
            tl.atomic_xchg(flag_ptr, tag, sem="release", scope="sys")


# num_tokens changes every step: never specialise on it, or a peer's recompile mid-step
# (seconds) would outlast the timeout.
@triton.jit(do_not_specialize=["num_tokens"])
def _dispatch_send_kernel(
    x_ptr,
    topk_phy_ptr,
    topk_weights_ptr,
    rank_mask_ptr,
    epoch_ptr,
    step_ptr,
    send_list_ptr,
    send_done_ptr,
    peer_base_ptr,
    num_tokens,
    src_rank,
    stride_x,
    hidden,
    off_recv_x,
    off_src_idx,
    off_weights,
    off_count,
    off_flag,
    TOPK: tl.constexpr,
    EXPERTS_PER_SLOT: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    MAX_TOKENS: tl.constexpr,
    BLOCK_SCAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_H_BLOCKS: tl.constexpr,
    ELASTIC: tl.constexpr,
):
    phy_id = tl.program_id(0)
    h_block = tl.program_id(1)
    dst = phy_id // EXPERTS_PER_SLOT
    local_expert = phy_id % EXPERTS_PER_SLOT
    num_flat = num_tokens * TOPK
    list_ptr = send_list_ptr + phy_id * MAX_TOKENS

    # Phase 1: the flat (t * K + k) entries routed to this physical expert, in order. Every
    # column block of this expert writes the same list; identical values, so no race.
    count = tl.zeros((), tl.int32)
    for start in range(0, num_flat, BLOCK_SCAN):
        offs = start + tl.arange(0, BLOCK_SCAN)
        phy = tl.load(topk_phy_ptr + offs, mask=offs < num_flat, other=-1)
        hit = (phy == phy_id).to(tl.int32)
        pos = count + tl.cumsum(hit, axis=0) - 1
        tl.store(list_ptr + pos, offs, mask=hit != 0)
        count += tl.sum(hit, axis=0)
    # The mask is read off the critical path (after the scan): routing never picks a dead
    # slot, this only keeps a stray entry from reaching one.
    dst_live = True
    if ELASTIC:
        dst_live = tl.load(rank_mask_ptr + dst) != 0
        count = tl.where(dst_live, count, 0)
    tl.debug_barrier()

    # Phase 2: dense copy of the listed rows into the destination's receive region.
    base = tl.load(peer_base_ptr + dst)
    recv_x = (base + off_recv_x).to(tl.pointer_type(x_ptr.dtype.element_ty))
    row0 = (local_expert * NUM_SLOTS + src_rank) * MAX_TOKENS
    cols = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    for i0 in range(0, count, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_mask = i < count
        flat = tl.load(list_ptr + i, mask=i_mask, other=0)
        tok = (flat // TOPK).to(tl.int64)
        m2 = i_mask[:, None] & col_mask[None, :]
        rows = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=m2)
        dst_rows = (row0 + i).to(tl.int64)
        tl.store(recv_x + dst_rows[:, None] * hidden + cols[None, :], rows, mask=m2)
        if h_block == 0:
            src_idx = (base + off_src_idx).to(tl.pointer_type(tl.int32))
            weights = (base + off_weights).to(tl.pointer_type(tl.float32))
            tl.store(src_idx + row0 + i, flat, mask=i_mask)
            w = tl.load(topk_weights_ptr + flat, mask=i_mask, other=0.0)
            tl.store(weights + row0 + i, w, mask=i_mask)
    if h_block == 0:
        if dst_live:  # a dead slot's buffer may not be mapped here (address 0)
            counts = (base + off_count).to(tl.pointer_type(tl.int32))
            tl.store(counts + src_rank * EXPERTS_PER_SLOT + local_expert, count)

    tag = _make_tag(tl.load(epoch_ptr), tl.load(step_ptr) + 1)
    flag = (base + off_flag).to(tl.pointer_type(tl.int64)) + src_rank
    _raise_when_last(send_done_ptr + dst, flag, tag, dst_live, EXPERTS_PER_SLOT * NUM_H_BLOCKS)


@triton.jit
def _wait_flags(
    flag_ptr,
    slots,
    expect,
    tag,
    epoch,
    timeout_ns,
    ELASTIC: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
):
    """Spins until every expected slot's flag equals ``tag``, the timeout passes or a newer
    epoch is seen; returns the per-slot state (``WAITING`` never survives). Without a global
    timer (the interpreter) each poll counts as one microsecond."""
    state = tl.where(expect, 0, 4)
    start = _now_ns(USE_GLOBALTIMER)
    polls = tl.zeros((), tl.int64)
    while tl.sum((state == 0).to(tl.int32), axis=0) > 0:
        waiting = state == 0
        seen = tl.atomic_add(flag_ptr + slots, 0, mask=waiting, sem="acquire", scope="sys")
        seen = tl.where(waiting, seen, 0)
        state = tl.where(waiting & (seen == tag), 1, state)
        if ELASTIC:
            newer = (state == 0) & ((seen >> 32) > epoch.to(tl.int64))
            any_newer = tl.sum(newer.to(tl.int32), axis=0) > 0
            state = tl.where((state == 0) & any_newer, 3, state)
            polls += 1
            if USE_GLOBALTIMER:
                elapsed = _now_ns(USE_GLOBALTIMER) - start
            else:
                elapsed = polls * 1000
            state = tl.where((state == 0) & (elapsed > timeout_ns), 2, state)
    tl.debug_barrier()
    return state


@triton.jit
def _wait_kernel(
    flag_ptr,
    count_ptr,
    recv_m_ptr,
    suspect_ptr,
    status_ptr,
    step_suspect_ptr,
    step_status_ptr,
    rank_mask_ptr,
    epoch_ptr,
    step_ptr,
    timeout_ns,
    NUM_SLOTS: tl.constexpr,
    EXPERTS_PER_SLOT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    IS_DISPATCH: tl.constexpr,
    ELASTIC: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
):
    """Dispatch (``IS_DISPATCH``): waits for step ``step + 1``, writes ``recv_m`` ``[L, S]``
    (0 for senders that did not arrive), resets ``suspect``/``status``, then advances ``step``.
    Combine: waits for step ``step`` from slots not already suspect; ORs into ``suspect``.

    ``step_suspect`` ``[S]``/``step_status`` ``[1]`` accumulate over the exchanges of one engine
    step (the caller reads them once per step and zeroes them): a slot that timed out earlier
    in the step is not waited for again (it counts as suspect), so a dead peer costs one
    ``timeout_ns`` per step, not one per exchange."""
    slots = tl.arange(0, BLOCK_S)
    slot_mask = slots < NUM_SLOTS
    epoch = tl.load(epoch_ptr)
    step = tl.load(step_ptr)
    if IS_DISPATCH:
        step = step + 1
    expect = slot_mask
    earlier = tl.zeros((BLOCK_S,), tl.int32)
    if ELASTIC:
        expect = expect & (tl.load(rank_mask_ptr + slots, mask=slot_mask, other=0) != 0)
        earlier = tl.load(step_suspect_ptr + slots, mask=slot_mask, other=0)
        expect = expect & (earlier == 0)
        if not IS_DISPATCH:
            expect = expect & (tl.load(suspect_ptr + slots, mask=slot_mask, other=1) == 0)
    state = _wait_flags(
        flag_ptr, slots, expect, _make_tag(epoch, step), epoch, timeout_ns, ELASTIC, USE_GLOBALTIMER
    )
    timed_out = (state == 2).to(tl.int32)
    status = tl.where(tl.sum(timed_out, axis=0) > 0, 1, 0)
    status |= tl.where(tl.sum((state == 3).to(tl.int32), axis=0) > 0, 2, 0)
    if IS_DISPATCH:
        experts = tl.arange(0, BLOCK_L)
        arrived = (state == 1)[None, :]
        m2 = (experts < EXPERTS_PER_SLOT)[:, None] & slot_mask[None, :]
        counts = tl.load(
            count_ptr + slots[None, :] * EXPERTS_PER_SLOT + experts[:, None],
            mask=m2 & arrived,
            other=0,
            volatile=True,
        )
        tl.store(recv_m_ptr + experts[:, None] * NUM_SLOTS + slots[None, :], counts, mask=m2)
        tl.store(suspect_ptr + slots, timed_out | earlier, mask=slot_mask)
        tl.store(status_ptr, status)
        tl.debug_barrier()
        tl.store(step_ptr, step)
    else:
        old = tl.load(suspect_ptr + slots, mask=slot_mask, other=0)
        tl.store(suspect_ptr + slots, old | timed_out, mask=slot_mask)
        tl.store(status_ptr, tl.load(status_ptr) | status)
    if ELASTIC:
        tl.store(step_suspect_ptr + slots, earlier | timed_out, mask=slot_mask)
        tl.store(step_status_ptr, tl.load(step_status_ptr) | status)


@triton.jit
def _combine_send_kernel(
    y_ptr,
    recv_m_ptr,
    src_idx_ptr,
    suspect_ptr,
    rank_mask_ptr,
    epoch_ptr,
    step_ptr,
    combine_done_ptr,
    peer_base_ptr,
    my_rank,
    stride_yg,
    stride_ym,
    hidden,
    off_buf,
    off_flag,
    EXPERTS_PER_SLOT: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    MAX_TOKENS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_H_BLOCKS: tl.constexpr,
    ELASTIC: tl.constexpr,
):
    """Program ``(l * S + s, column block)`` returns the rows local expert ``l`` computed for
    slot ``s``. ``y`` is ``[L * S, C, H]`` (rows may be strided)."""
    group = tl.program_id(0)
    h_block = tl.program_id(1)
    src = group % NUM_SLOTS
    num_rows = tl.load(recv_m_ptr + group)
    src_ok = True
    if ELASTIC:
        src_ok = (tl.load(rank_mask_ptr + src) != 0) & (tl.load(suspect_ptr + src) == 0)
    num_rows = tl.where(src_ok, num_rows, 0)
    base = tl.load(peer_base_ptr + src)
    out = (base + off_buf).to(tl.pointer_type(y_ptr.dtype.element_ty))
    cols = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    y_group = y_ptr + group.to(tl.int64) * stride_yg
    for i0 in range(0, num_rows, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_mask = i < num_rows
        flat = tl.load(src_idx_ptr + group * MAX_TOKENS + i, mask=i_mask, other=0).to(tl.int64)
        m2 = i_mask[:, None] & col_mask[None, :]
        rows = tl.load(y_group + i[:, None].to(tl.int64) * stride_ym + cols[None, :], mask=m2)
        tl.store(out + flat[:, None] * hidden + cols[None, :], rows, mask=m2)

    tag = _make_tag(tl.load(epoch_ptr), tl.load(step_ptr))
    flag = (base + off_flag).to(tl.pointer_type(tl.int64)) + my_rank
    _raise_when_last(combine_done_ptr + src, flag, tag, src_ok, EXPERTS_PER_SLOT * NUM_H_BLOCKS)


@triton.jit(do_not_specialize=["num_tokens"])
def _combine_reduce_kernel(
    buf_ptr,
    topk_phy_ptr,
    topk_weights_ptr,
    rank_mask_ptr,
    suspect_ptr,
    out_ptr,
    num_tokens,
    hidden,
    stride_out,
    TOPK: tl.constexpr,
    EXPERTS_PER_SLOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ELASTIC: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr,
):
    """``out[t] = sum_k w[t, k] * buf[t * K + k]`` over entries whose slot delivered."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < num_tokens
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for k in tl.static_range(TOPK):
        flat = tok * TOPK + k
        phy = tl.load(topk_phy_ptr + flat, mask=tok_mask, other=-1)
        ok = phy >= 0
        # rows load under `phy >= 0` alone, so the mask/suspect loads overlap with them
        w = tl.load(topk_weights_ptr + flat, mask=ok, other=0.0)
        row = tl.load(
            buf_ptr + flat[:, None].to(tl.int64) * hidden + cols[None, :],
            mask=ok[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if ELASTIC:
            slot = phy // EXPERTS_PER_SLOT
            alive = tl.load(rank_mask_ptr + slot, mask=ok, other=0) != 0
            suspect = tl.load(suspect_ptr + slot, mask=ok, other=1) != 0
            ok = ok & alive & (suspect == 0)
        if EXACT_ROUNDING:
            # One rounding per multiply and per add, as the reference does (no FMA).
            nxt = libdevice.add_rn(acc, libdevice.mul_rn(w[:, None] + tl.zeros_like(row), row))
        else:
            nxt = acc + w[:, None] * row
        acc = tl.where(ok[:, None], nxt, acc)
    out = out_ptr + tok[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tok_mask[:, None] & col_mask[None, :])


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))
