"""Causal attention of new tokens over a request's cached context (GQA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """``q`` ``[n, H_q, D]`` at positions ``start .. start+n-1``; ``k``/``v`` ``[start+n, H_kv, D]``
    -> ``[n, H_q * D]``. Query ``i`` sees keys ``0 .. start+i``."""
    n, heads, dim = q.shape
    groups = heads // k.shape[1]
    kk = k.repeat_interleave(groups, dim=1).transpose(0, 1)  # [H_q, ctx, D]
    vv = v.repeat_interleave(groups, dim=1).transpose(0, 1)
    ctx = k.shape[0]
    qpos = torch.arange(start, start + n, device=q.device)[:, None]
    mask = torch.arange(ctx, device=q.device)[None, :] <= qpos  # [n, ctx]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)
    return out.transpose(0, 1).reshape(n, heads * dim)
