"""Grouped SwiGLU expert MLP over rows grouped by local expert (the masked layout).

``x`` ``[G, C, H]`` holds ``group_m[g]`` valid rows in group ``g``; group ``g`` belongs to local
expert ``g // groups_per_expert``. Dispatch output ``recv_x`` ``[L, S * C, H]`` is this layout
with ``G = L * S`` and ``groups_per_expert = S`` (one group per sending slot); a plain
"rows sorted by expert" batch is ``groups_per_expert = 1``. Tiles past ``group_m`` exit at once,
so the row counts stay on the device (no host sync, graph-safe).

Two kernels: gate/up with SiLU(gate) * up fused into the epilogue (``h`` ``[G, C, I]``), then
down (``y`` ``[G, C, H]``). Inputs bf16 (float32 for the CPU interpreter), accumulation float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemmTiles:
    """Tile shape and launch shape of one GEMM kernel."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


# Hopper defaults (tuned on the lent H100; see docs/benchmarks.md). The gate/up kernel keeps two
# accumulators, so its N tile is half as wide.
GATE_UP_TILES = GemmTiles(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
DOWN_TILES = GemmTiles(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)
DECODE_TILES = GemmTiles(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4)
INTERPRETER_TILES = GemmTiles(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w13_ptr,
    h_ptr,
    group_m_ptr,
    cap,
    hidden,
    inter,
    stride_xg,
    stride_xm,
    stride_we,
    stride_wn,
    stride_hg,
    stride_hm,
    GROUPS_PER_EXPERT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tiles_per_group = tl.cdiv(cap, BLOCK_M)
    pid_m = tl.program_id(0)
    group = pid_m // tiles_per_group
    row0 = (pid_m % tiles_per_group) * BLOCK_M
    num_rows = tl.load(group_m_ptr + group)
    if row0 >= num_rows:
        return
    expert = group // GROUPS_PER_EXPERT
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + group.to(tl.int64) * stride_xg + rows[:, None] * stride_xm + ks[None, :]
    w_base = w13_ptr + expert.to(tl.int64) * stride_we
    g_ptrs = w_base + cols[None, :] * stride_wn + ks[:, None]
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            bg = tl.load(g_ptrs, mask=col_mask[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + ks) < hidden
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_ptrs = h_ptr + group.to(tl.int64) * stride_hg + rows[:, None] * stride_hm + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr,
    w2_ptr,
    y_ptr,
    group_m_ptr,
    cap,
    hidden,
    inter,
    stride_hg,
    stride_hm,
    stride_we,
    stride_wn,
    stride_yg,
    stride_ym,
    GROUPS_PER_EXPERT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tiles_per_group = tl.cdiv(cap, BLOCK_M)
    pid_m = tl.program_id(0)
    group = pid_m // tiles_per_group
    row0 = (pid_m % tiles_per_group) * BLOCK_M
    num_rows = tl.load(group_m_ptr + group)
    if row0 >= num_rows:
        return
    expert = group // GROUPS_PER_EXPERT
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + group.to(tl.int64) * stride_hg + rows[:, None] * stride_hm + ks[None, :]
    b_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + ks) < inter
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    y_ptrs = y_ptr + group.to(tl.int64) * stride_yg + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _pick_tiles(x: torch.Tensor, default: GemmTiles) -> GemmTiles:
    if not x.is_cuda:
        return INTERPRETER_TILES
    return DECODE_TILES if x.shape[1] <= 64 else default


def grouped_swiglu(
    x: torch.Tensor,
    group_m: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    groups_per_expert: int = 1,
    h: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    gate_up_tiles: GemmTiles | None = None,
    down_tiles: GemmTiles | None = None,
) -> torch.Tensor:
    """``y = (silu(x @ W1^T) * (x @ W3^T)) @ W2^T`` per group; returns ``[G, C, H]``.

    ``x`` ``[G, C, H]`` (rows may be strided, last dim contiguous); ``group_m`` ``[G]`` int32;
    ``w13`` ``[E, 2I, H]`` (gate rows ``[:I]``, up rows ``[I:]``); ``w2`` ``[E, H, I]``;
    ``h`` ``[G, C, I]`` scratch and ``out`` ``[G, C, H]`` may be passed to reuse buffers.
    Rows past ``group_m[g]`` of ``out`` are left untouched.
    """
    num_groups, cap, hidden = x.shape
    inter = w2.shape[2]
    if w13.shape[1:] != (2 * inter, hidden) or w2.shape[1] != hidden:
        raise ValueError(
            f"grouped_swiglu: w13 {tuple(w13.shape)} must be [E, 2I, H] and w2 {tuple(w2.shape)} "
            f"[E, H, I] for hidden {hidden}."
        )
    if x.stride(2) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("grouped_swiglu needs the last dimension of x, w13 and w2 contiguous.")
    if h is None:
        h = torch.empty(num_groups, cap, inter, dtype=x.dtype, device=x.device)
    if out is None:
        out = torch.empty_like(x)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    tiles = gate_up_tiles or _pick_tiles(x, GATE_UP_TILES)
    grid = (num_groups * triton.cdiv(cap, tiles.block_m), triton.cdiv(inter, tiles.block_n))
    if grid[0] > 0:
        _gate_up_kernel[grid](
            x, w13, h, group_m, cap, hidden, inter,
            x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), h.stride(0), h.stride(1),
            GROUPS_PER_EXPERT=groups_per_expert,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            EVEN_K=hidden % tiles.block_k == 0, DOT_PRECISION=precision,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    tiles = down_tiles or _pick_tiles(x, DOWN_TILES)
    grid = (num_groups * triton.cdiv(cap, tiles.block_m), triton.cdiv(hidden, tiles.block_n))
    if grid[0] > 0:
        _down_kernel[grid](
            h, w2, out, group_m, cap, hidden, inter,
            h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), out.stride(0), out.stride(1),
            GROUPS_PER_EXPERT=groups_per_expert,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            EVEN_K=inter % tiles.block_k == 0, DOT_PRECISION=precision,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    return out
