"""Causal attention of a step's new tokens over their requests' cached context (GQA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BatchAttention:
    """Attention of a whole step's requests at once over the paged cache (one plan per step,
    reused by every layer): K/V of the new tokens written with one indexed store, every
    request's context gathered into ``[B, C, H_kv, D]`` (padded to the longest, masked), one
    ``scaled_dot_product_attention`` call. Query ``i`` of request ``b`` sees its keys
    ``0 .. start_b + i``; padded query rows are computed and dropped."""

    def __init__(
        self,
        tables: list[list[int]],
        starts: list[int],
        counts: list[int],
        block_size: int,
        device: torch.device,
    ):
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)
        num_blocks = max(len(t) for t in tables)
        table = as_long([t + [0] * (num_blocks - len(t)) for t in tables])  # [B, MB]
        start, count = as_long(starts), as_long(counts)
        n_max, ctx_max = max(counts), max(s + c for s, c in zip(starts, counts, strict=True))
        # the step's token rows: request b_t, position p_t
        seq = torch.repeat_interleave(torch.arange(len(counts), device=device), count)
        first_row = torch.cumsum(count, 0) - count
        idx = torch.arange(seq.shape[0], device=device) - first_row[seq]  # i within request
        pos = start[seq] + idx
        self.write_block = table[seq, pos // block_size]
        self.write_offset = pos % block_size
        kpos = torch.arange(ctx_max, device=device)
        self.read_block = table[:, kpos // block_size]  # [B, C]
        self.read_offset = (kpos % block_size).expand_as(self.read_block)
        qi = torch.arange(n_max, device=device)
        qpos = start[:, None] + qi[None, :]  # [B, N]
        self.mask = (kpos[None, None, :] <= qpos[:, :, None]).unsqueeze(1)  # [B, 1, N, C]
        self.q_rows = first_row[:, None] + torch.minimum(qi[None, :], count[:, None] - 1)
        self.out_seq, self.out_idx = seq, idx

    @classmethod
    def decode(
        cls, table: torch.Tensor, positions: torch.Tensor, block_size: int
    ) -> BatchAttention:
        """The plan of a decode step from device tensors alone (graph-capturable): row ``b``
        is one query at ``positions[b]`` of the request whose block table is ``table[b]``;
        the context is ``table.shape[1] * block_size`` positions, those past the query
        masked."""
        self = cls.__new__(cls)
        rows, width = table.shape
        kpos = torch.arange(width * block_size, device=table.device)
        self.write_block = table.gather(1, (positions // block_size)[:, None]).squeeze(1)
        self.write_offset = positions % block_size
        self.read_block = table[:, kpos // block_size]  # [B, C]
        self.read_offset = (kpos % block_size).expand_as(self.read_block)
        self.mask = (kpos[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, C]
        row = torch.arange(rows, device=table.device)
        self.q_rows = row[:, None]
        self.out_seq, self.out_idx = row, torch.zeros_like(row)
        return self

    def __call__(
        self, arena: torch.Tensor, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """``q`` ``[T, H_q, D]``, ``k``/``v`` ``[T, H_kv, D]`` of the step's tokens;
        ``arena`` the KV cache arena -> ``[T, H_q * D]``."""
        arena[self.write_block, layer, 0, self.write_offset] = k.to(arena.dtype)
        arena[self.write_block, layer, 1, self.write_offset] = v.to(arena.dtype)
        keys = arena[self.read_block, layer, 0, self.read_offset].to(q.dtype)  # [B, C, Hk, D]
        values = arena[self.read_block, layer, 1, self.read_offset].to(q.dtype)
        heads, dim = q.shape[1], q.shape[2]
        groups = heads // keys.shape[2]
        kk = keys.repeat_interleave(groups, dim=2).transpose(1, 2)  # [B, H_q, C, D]
        vv = values.repeat_interleave(groups, dim=2).transpose(1, 2)
        qq = q[self.q_rows].transpose(1, 2)  # [B, H_q, N, D]
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=self.mask)  # [B, H_q, N, D]
        return out.transpose(1, 2)[self.out_seq, self.out_idx].reshape(-1, heads * dim)
