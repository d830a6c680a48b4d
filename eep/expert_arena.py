"""A rank's expert weights in one registered arena, and filling it from live peers.

The arena holds, for every MoE layer, the local experts' gate and up projections back to back
(``[L, 2I, H]``: the model's ``w_gate_up``), then their down projections (``[L, H, I]``:
``w_down``); the model's parameters are views of it, so one registration covers every expert
and a peer can read any expert by name. Tensors are named as in the checkpoint
(``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``, ``e`` the logical expert),
so any holder of logical expert ``e`` can serve it, whatever its physical position, and the
checkpoint on disk is the last fallback under the same names.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from eep.model.checkpoint import expert_tensor_names
from eep.model.qwen3_moe import Qwen3MoeModel
from eep.transfer.arena import ALIGN, Arena, ArenaLayout, dtype_name
from eep.transfer.checkpoint import Checkpoint
from eep.transfer.checksum import format_checksum, range_checksums
from eep.transfer.config import TransferConfig
from eep.transfer.executor import OnPlan, Puller
from eep.transfer.manifest import ManifestStore, build_manifest


def expert_layout(model: Qwen3MoeModel) -> ArenaLayout:
    cfg, dtype = model.config, dtype_name(model.embed_tokens.weight.dtype)
    inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
    tensors = []
    for i, layer in enumerate(model.layers):
        if not layer.is_moe:
            continue
        names = [expert_tensor_names(cfg, i, e) for e in layer.moe.local_experts]
        for gate, up, _ in names:
            tensors += [(gate, dtype, (inter, hidden)), (up, dtype, (inter, hidden))]
        tensors += [(down, dtype, (hidden, inter)) for _, _, down in names]
    layout = ArenaLayout.pack(tensors)
    odd = [s.name for s in layout.specs if s.nbytes % ALIGN]
    if odd:
        raise ValueError(
            f"expert tensors of {layout.specs[0].nbytes} bytes are not multiples of the arena "
            f"alignment ({ALIGN} B), so a layer's experts cannot be one contiguous stack."
        )
    return layout


@dataclass
class PullStats:
    nbytes: int
    seconds: float
    from_peers: dict[str, int]
    from_disk: int
    failed: dict[str, str] = field(default_factory=dict)  # holders that failed mid-pull: why
    # tensor -> the checksum its bytes were verified against (those pulled from peers)
    checksums: dict[str, str] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class ExpertArena:
    """The arena of ``model``'s local experts; :meth:`bind` makes the model's stacks views of
    it (their contents are then whatever the arena holds)."""

    def __init__(self, model: Qwen3MoeModel, device: str | torch.device):
        self.model = model
        self.arena = Arena("experts", expert_layout(model), device)
        self.bind()

    def bind(self) -> None:
        cfg = self.model.config
        inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
        dtype = self.model.embed_tokens.weight.dtype
        for i, layer in enumerate(self.model.layers):
            if not layer.is_moe:
                continue
            moe, first = layer.moe, layer.moe.local_experts[0]
            gate, _, down = expert_tensor_names(cfg, i, first)
            num = len(moe.local_experts)
            moe.w_gate_up.data = self._stack(gate, dtype, (num, 2 * inter, hidden))
            moe.w_down.data = self._stack(down, dtype, (num, hidden, inter))

    def _stack(self, first: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        start = self.arena.layout[first].offset
        nbytes = dtype.itemsize * shape[0] * shape[1] * shape[2]
        return self.arena.buffer[start : start + nbytes].view(dtype).view(shape)

    def fill(
        self,
        transport,
        store: ManifestStore,
        config: TransferConfig,
        checkpoint_path: str | None,
        exclude: tuple[str, ...] = (),
        peers: bool = True,
        on_plan: OnPlan | None = None,
    ) -> PullStats:
        """Every local expert from live holders (several at once, verified), the rest from
        the checkpoint; ``peers=False``: all from the checkpoint. ``checkpoint_path=None``: no
        fallback (a bench; a tensor no holder has is then :class:`NoSource`). ``on_plan``: see
        :meth:`eep.transfer.executor.Puller.pull`."""
        manifests = [m for m in store.live() if m.holder not in exclude] if peers else []
        started = time.monotonic()
        checkpoint = Checkpoint(checkpoint_path) if checkpoint_path is not None else None
        report = Puller(transport, self.arena, config).pull(
            manifests, checkpoint=checkpoint, on_plan=on_plan
        )
        disk = sum(self.arena.layout[n].nbytes for n in report.from_disk)
        return PullStats(
            report.nbytes,
            time.monotonic() - started,
            dict(report.bytes_by_holder),
            disk,
            dict(report.failed_holders),
            dict(report.verified),
        )

    def publish(
        self,
        transport,
        store: ManifestStore,
        holder: str,
        host_id: str,
        slot: int,
        incarnation: int,
        lease: int,
        extra: tuple[Arena, ...] = (),
        known: dict[str, str] | None = None,
    ) -> None:
        """Register the arena and publish its manifest (with the already registered
        ``extra`` arenas, e.g. the KV blocks), bound to the slot's lease. ``known``: tensor ->
        checksum for tensors whose bytes a pull just verified against it (:attr:`PullStats.
        checksums`); only the others are computed here."""
        self.arena.register(transport)
        sums, specs = dict(known or {}), self.arena.layout.specs
        todo = [s for s in specs if s.name not in sums]
        if todo:
            # one computation, as a reader verifies (values identical to checksum)
            values = range_checksums(
                self.arena.buffer, [s.offset for s in todo], [s.nbytes for s in todo]
            )
            sums |= {s.name: format_checksum(v) for s, v in zip(todo, values.tolist(), strict=True)}
        sums = {s.name: sums[s.name] for s in specs}  # layout order
        manifest = build_manifest(
            holder,
            transport,
            [self.arena, *extra],
            sums,
            host_id,
            slot=slot,
            incarnation=incarnation,
            pid=os.getpid(),
        )
        store.publish(manifest, lease=lease)
