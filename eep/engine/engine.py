"""One engine step: attention for this rank's own requests, MoE through the executor.

A step either completes on every layer or raises (a fabric that lost a peer raises
``ExchangeFailed``); only a completed step advances sequences, so a straddling step leaves
no trace but KV entries that the re-run overwrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eep.config import DEFAULT_MAX_CUDA_GRAPHS
from eep.model.qwen3_moe import Qwen3MoeModel

from .attention import BatchAttention
from .decode_graph import DecodeRunner
from .kv_cache import KVCache, KVCacheConfig
from .moe_exec import LocalMoE, MoEExecutor
from .sampling import SamplingParams, sample
from .sequence import FinishReason, Scheduled, Scheduler, Sequence


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: str
    index: int  # position in the request's outputs
    token: int
    finished: FinishReason | None


class Engine:
    def __init__(
        self,
        model: Qwen3MoeModel,
        kv_blocks: int = 256,
        block_size: int = 16,
        max_tokens_per_step: int = 64,
        moe: MoEExecutor | None = None,
        kv_buffer: torch.Tensor | None = None,
        decode_graphs: bool = False,
        max_seqs: int = 256,
        max_graphs: int = DEFAULT_MAX_CUDA_GRAPHS,
    ):
        """``decode_graphs``: run decode steps on static, padded buffers and, on a GPU with
        a graph-safe MoE executor, replay them from CUDA graphs (``decode_graph``), at most
        ``max_graphs`` held at once (``RuntimeConfig.max_cuda_graphs``)."""
        cfg = model.config
        self.model = model
        device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        self.device = device
        kv_cfg = KVCacheConfig(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kv_blocks, block_size
        )
        self.kv = KVCache(kv_cfg, dtype, device, kv_buffer)
        self.scheduler = Scheduler(self.kv, max_tokens_per_step, max_seqs)
        self.moe: MoEExecutor = moe or LocalMoE()
        self.steps = 0
        self.decode: DecodeRunner | None = (
            DecodeRunner(self, max_graphs=max_graphs) if decode_graphs else None
        )

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; a ``ValueError`` if it could never fit this rank's KV cache (the
        scheduler admits in arrival order, so such a request would block every later one)."""
        if seq.max_len > self.max_model_len:
            raise ValueError(
                f"{len(seq.prompt)} prompt tokens + max_tokens {seq.params.max_tokens} = "
                f"{seq.max_len} exceed what this rank's KV cache holds for one request "
                f"({self.max_model_len} tokens)."
            )
        self.scheduler.add(seq)

    @property
    def max_model_len(self) -> int:
        """Prompt + max_tokens of one request, at most (``RuntimeConfig.rank_kv_tokens``)."""
        return self.kv.capacity_tokens

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Run one step (possibly with zero tokens: every live slot joins every exchange)."""
        batch = self.scheduler.schedule()
        if self.decode is not None and self.decode.fits(batch):
            logits = self.decode.step(batch, self._end_step)
        else:
            ids, positions = self._inputs(batch)
            plan = self._plan(batch) if batch else None
            h = self.layers(self.model.embed(ids), positions, plan)
            self._end_step()
            ends = torch.tensor([0] + [s.count for s in batch]).cumsum(0)[1:] - 1
            sampling = [i for i, s in enumerate(batch) if s.samples]
            logits = self.model.final(h[ends[sampling]]) if sampling else None
        self.steps += 1
        return self._commit(batch, logits)

    def layers(self, h: torch.Tensor, positions: torch.Tensor, plan) -> torch.Tensor:
        """Every decoder layer over the step's hidden states ``h`` ``[T, H]``."""
        for idx, layer in enumerate(self.model.layers):
            h = h + self._attention(idx, layer, layer.input_layernorm(h), positions, plan)
            x = layer.post_attention_layernorm(h)
            h = h + (self.moe(idx, layer.moe, x) if layer.is_moe else layer.mlp(x))
        return h

    def _end_step(self) -> None:
        self.moe.end_step()  # a fabric that checks once per step raises ExchangeFailed here

    def _inputs(self, batch: list[Scheduled]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, positions = [], []
        for s in batch:
            ids.extend(s.seq.tokens[s.start : s.start + s.count])
            positions.extend(range(s.start, s.start + s.count))
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)
        return as_long(ids), as_long(positions)

    def _plan(self, batch: list[Scheduled]) -> BatchAttention:
        return BatchAttention(
            [s.seq.table.blocks for s in batch],
            [s.start for s in batch],
            [s.count for s in batch],
            self.kv.cfg.block_size,
            self.device,
        )

    def _attention(self, idx, layer, x, positions, plan) -> torch.Tensor:
        attn = layer.self_attn
        q, k, v = attn.qkv(x, positions)
        if plan is None:  # an empty step: nothing to attend, the exchange still happens
            return attn.out(q.reshape(0, q.shape[1] * q.shape[2]))
        return attn.out(plan(self.kv.arena, idx, q, k, v))

    def _commit(self, batch: list[Scheduled], logits: torch.Tensor | None) -> list[TokenEvent]:
        """``logits``: one row per sampling request of ``batch``, in batch order."""
        sampling = [i for i, s in enumerate(batch) if s.samples]
        events = []
        for s in batch:
            s.seq.num_computed += s.count
        for row, i in enumerate(sampling):
            seq = batch[i].seq
            token = sample(logits[row], seq.params, len(seq.outputs))
            seq.outputs.append(token)
            if token in seq.params.stop_token_ids:
                seq.finished = FinishReason.STOP
            elif len(seq.outputs) >= seq.params.max_tokens:
                seq.finished = FinishReason.LENGTH
            events.append(TokenEvent(seq.request_id, len(seq.outputs) - 1, token, seq.finished))
            if seq.finished:
                self.scheduler.retire(seq)
        return events

    def warm_up(self) -> None:
        """One step of a one-token request (compiles and caches every kernel of a step);
        its KV blocks are released and nothing of it stays."""
        seq = Sequence("__warm_up__", [0], [], SamplingParams(max_tokens=1))
        self.scheduler.add(seq)
        while not seq.finished:
            self.step()

    def run_to_completion(self, max_steps: int = 100_000) -> dict[str, list[int]]:
        """Step until no work is left (single-process use): ``{request_id: outputs}``."""
        outputs: dict[str, list[int]] = {}
        for _ in range(max_steps):
            if not self.scheduler.has_work():
                return outputs
            for event in self.step():
                outputs.setdefault(event.request_id, []).append(event.token)
        raise RuntimeError(f"requests still running after {max_steps} steps")
